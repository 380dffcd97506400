"""cao: a CLI Agent Orchestrator in one file.

cao runs AI coding-agent CLIs (Claude Code, Codex, ... and a built-in demo agent)
in tmux windows and lets a supervisor agent hand work to worker agents. One local
HTTP server owns tmux, the sqlite state and status detection; the CLI, the web
dashboard and the MCP servers are its clients. Only the standard library is
imported at module level; `mcp` and `croniter` are imported where they are used.

Map of this file. Each section uses only the sections above it; the provider
table at the end is data that the providers section reads.

  errors            one exception tree, mapped to HTTP codes and exit codes once
  helpers           names and their checks, small shared functions, the YAML
                    subset that profile frontmatter is written in
  paths and config  CAO_HOME_DIR, file boundaries (no link out of cao's folders),
                    settings.json (cached until it changes), packaged resources
  profiles          agent profiles: discovery, loading, install
  client            the REST API as the CLI and MCP servers call it, one method
                    per route
  state             sqlite store (sessions, terminals, inbox, events) and the
                    in-process Bus that features subscribe to
  tmux              every tmux call, each with a timeout, on an optional -L socket
  providers         the provider field schema; launching a CLI from an entry,
                    reading its status and its last answer from the screen
  terminals         Terminal (one live record each), PaneWatcher, StatusTracker,
                    TerminalInput, Capacity (the fleet's limits), Launcher (a
                    record to a CLI in a window), Terminals and Sessions
  inbox and orchestration  durable messages delivered when the receiver is idle;
                    server-side handoffs under job ids; the agents' tools
                    (handoff, assign, send_message, ...) and the ops tools
  resume            terminals whose tmux died are kept as lost and brought back
                    with their CLI's conversation; the watchdog tells a caller
                    when its worker stops or hangs
  memory            what agents store, ranked by FTS5; the <cao-memory> block
  skills            SKILL.md folders and how each CLI gets them
  flows             agent sessions on a cron schedule, with gating scripts
  plugins and webhooks  observers that follow the event log, each on its own
  application       App: makes the parts above and wires them together
  HTTP API          routes by resource; Host, Origin and framing checks; limits;
                    web_static/ (the web console) with ETags and gzip
  MCP servers       `cao mcp` and `cao ops-mcp` serve the tool tables over stdio
  demo agent        the small interactive agent behind the `demo` provider
  CLI               a table of @command functions, each with its options;
                    main() is the entry point
  provider table    one entry per CLI, as data

docs/architecture.md follows one message through these sections.
"""

import argparse
import errno
import http
import io
import ipaddress
import json
import os
import re
import select
import selectors
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import urllib.parse
import uuid
import zipimport
from pathlib import Path

__version__ = "0.1.0"

###############################################################################
# Errors ######################################################################
###############################################################################

class CaoError(Exception):
    """Base of every error cao reports; `status` is its HTTP code."""
    status = 400


class ConfigError(CaoError):
    pass


class ProfileError(CaoError):
    pass


class NeedsLogin(CaoError):
    """An agent's CLI found no credentials and asks for a login."""


class Forbidden(CaoError):
    status = 403


class NotFound(CaoError):
    status = 404


class Conflict(CaoError):
    status = 409


class Busy(Conflict):
    """Input held back: the agent turned busy before its turn to type came."""


class TooLarge(CaoError):
    status = 413


class AtCapacity(CaoError):
    """A fleet limit from settings.json leaves no room for another agent."""
    status = 429


class TmuxError(CaoError):
    status = 503


class ServerUnavailable(CaoError):
    status = 503


class WaitTimeout(CaoError):
    status = 504


class StepFailed(CaoError):
    """A run-step that ran but did not answer: its detail is an object that says
    which kind of failure (error, timeout) and which worker, for the caller to act on."""

    def __init__(self, status, kind=None, message="", **fields):
        super().__init__(message)
        self.status, self.detail = status, {"message": message, "kind": kind, **fields}


###############################################################################
# Helpers #####################################################################
###############################################################################

# -- names ---------------------------------------------------------------------

SESSION_PREFIX = "cao-"
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")
TERMINAL_ID_RE = re.compile(r"[0-9a-f]{8}")
PROFILE_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
HOSTNAME_RE = re.compile(r"(?=.{1,253}\Z)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")


def session_name_for(name):
    if not isinstance(name, str) or not name.strip():
        raise CaoError("session name is empty; name a session (see `cao session list`)")
    name = name if name.startswith(SESSION_PREFIX) else SESSION_PREFIX + name
    if not NAME_RE.fullmatch(name):
        raise CaoError(f"invalid session name {name!r}; use letters, digits, '_' or '-' (max 64)")
    return name


def check_terminal_id(terminal_id):
    if not isinstance(terminal_id, str) or not TERMINAL_ID_RE.fullmatch(terminal_id):
        raise CaoError(f"invalid terminal id {terminal_id!r}; ids are 8 lowercase hex characters")
    return terminal_id


CONVERSATION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def check_conversation_id(conversation_id):
    """A CLI's own conversation id: it goes into the CLI's argv, so it may never read
    as an option, and into file names, so no separators."""
    if not isinstance(conversation_id, str) or not CONVERSATION_ID_RE.fullmatch(conversation_id):
        raise CaoError(f"invalid conversation id {conversation_id!r}; use letters, digits and "
                       "._:- (up to 128), such as a session uuid the CLI printed")
    return conversation_id


def _iso(ts):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ts)) if ts else None


def command_version(argv):
    """The first line a program prints for --version (or -V), or None."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=15,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0].strip()[:80] if lines else None


def _flag(name, default):
    value = os.environ.get(name, "").strip().lower() or default
    return value not in ("0", "false", "no", "off")


_settings_cache = {}  # path -> (file identity, settings)


def _check_profile_name(name):
    if not isinstance(name, str) or not PROFILE_NAME_RE.fullmatch(name):
        raise CaoError(f"invalid agent profile name {name!r}; use 1-64 letters, digits, '_' or '-'")


# -- the YAML subset of profile frontmatter ---------------------------------------

# Profiles are Markdown with YAML frontmatter. Only the YAML that profiles use is
# parsed: block maps and lists, flow lists and maps one level deep, quoted and
# plain scalars (plain ones may go on over deeper lines), block scalars. Anything else is an error naming file and line.

_YAML_BOOLS = {"true": True, "yes": True, "on": True,
               "false": False, "no": False, "off": False}
_YAML_INT = re.compile(r"[-+]?(0|[1-9][0-9_]*)")
_YAML_FLOAT = re.compile(r"[-+]?([0-9][0-9_]*)?\.[0-9_]*([eE][-+][0-9]+)?")
_YAML_DATE = re.compile(r"\d{4}-\d\d?-\d\d?([Tt ].*)?")
_DQ_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", '"': '"', "\\": "\\",
               "/": "/", " ": " ", "a": "\a", "b": "\b", "e": "\x1b"}


class _YamlLine:
    __slots__ = ("no", "indent", "text")

    def __init__(self, no, indent, text):
        self.no, self.indent, self.text = no, indent, text


class _YamlSubset:
    def __init__(self, text, source, first_line):
        self.source = source
        self.raw = text.split("\n")
        self.first = first_line
        self.lines = []
        for i, raw in enumerate(self.raw):
            stripped = raw.lstrip(" ")
            if stripped.startswith("\t"):
                self.fail(i, "tab used for indentation; indent with spaces")
            content = self._strip_comment(stripped, i)
            if content:
                self.lines.append(_YamlLine(i, len(raw) - len(stripped), content))
        self.pos = 0

    def fail(self, index, why):
        raise ProfileError(f"{self.source}:{self.first + index}: {why}")

    def _strip_comment(self, s, index):
        quote = None
        for i, ch in enumerate(s):
            if quote:
                if ch == quote:
                    quote = None
            elif ch in "\"'" and (i == 0 or s[i - 1] in " [{,:-"):
                quote = ch
            elif ch == "#" and (i == 0 or s[i - 1] in " \t"):
                return s[:i].rstrip()
        return s.rstrip()

    def parse(self):
        if not self.lines:
            return {}
        first = self.lines[0]
        if first.indent:
            self.fail(first.no, "frontmatter must start at column 1")
        value = self.block(0)
        if self.pos < len(self.lines):
            self.fail(self.lines[self.pos].no, "unexpected indentation")
        if not isinstance(value, dict):
            self.fail(first.no, "frontmatter must be a mapping of keys to values")
        return value

    def block(self, indent):
        line = self.lines[self.pos]
        if line.text == "-" or line.text.startswith("- "):
            return self.seq(indent)
        return self.mapping(indent)

    def seq(self, indent):
        items = []
        while self.pos < len(self.lines):
            line = self.lines[self.pos]
            if line.indent < indent:
                break
            if line.indent > indent:
                self.fail(line.no, "unexpected indentation")
            if not (line.text == "-" or line.text.startswith("- ")):
                break
            rest = line.text[1:].lstrip(" ")
            if not rest:
                self.pos += 1
                items.append(self.nested(line, indent))
                continue
            # "- key: value" opens a mapping whose keys align with "key".
            inner = line.indent + len(line.text) - len(rest)
            if self._key_split(rest, line) is not None:
                self.lines[self.pos] = _YamlLine(line.no, inner, rest)
                items.append(self.mapping(inner))
            else:
                self.pos += 1
                items.append(self.inline(rest, line))
        return items

    def mapping(self, indent):
        result = {}
        while self.pos < len(self.lines):
            line = self.lines[self.pos]
            if line.indent < indent:
                break
            if line.indent > indent:
                self.fail(line.no, "unexpected indentation")
            split = self._key_split(line.text, line)
            if split is None:
                if line.text.startswith("- "):
                    break
                self.fail(line.no, f"expected 'key: value', got {line.text!r}")
            key, rest = split
            if key in result:
                self.fail(line.no, f"duplicate key {key!r}")
            self.pos += 1
            if not rest:
                result[key] = self.nested(line, indent, allow_same_indent_seq=True)
            elif rest[0] in "|>":
                result[key] = self.block_scalar(rest, line, indent)
            else:
                if rest[0] not in "\"'[{":  # a plain value goes on over deeper lines
                    while self.pos < len(self.lines) and self.lines[self.pos].indent > indent:
                        rest += " " + self.lines[self.pos].text
                        self.pos += 1
                result[key] = self.inline(rest, line)
        return result

    def nested(self, parent, indent, allow_same_indent_seq=False):
        if self.pos >= len(self.lines):
            return None
        nxt = self.lines[self.pos]
        if nxt.indent > indent:
            return self.block(nxt.indent)
        if allow_same_indent_seq and nxt.indent == indent and (
                nxt.text == "-" or nxt.text.startswith("- ")):
            return self.seq(indent)
        return None

    def _key_split(self, text, line):
        if text[0] in "\"'":
            end = self._quote_end(text, line)
            key = self.scalar(text[:end + 1], line)
            rest = text[end + 1:]
            if not rest.startswith(":"):
                return None
            return key, rest[1:].strip()
        if text[0] in "?&*!%@`|>[{":
            if text[0] in "?&*!%@`":
                self.fail(line.no, f"YAML feature {text[0]!r} is not supported in profiles")
            return None
        m = re.match(r"([^:]*?)\s*:(?:\s+|$)", text)
        if not m or m.group(1).startswith("- ") or not m.group(1):
            return None
        return m.group(1), text[m.end():].strip()

    def _quote_end(self, text, line):
        quote, i = text[0], 1
        while i < len(text):
            if text[i] == "\\" and quote == '"':
                i += 2
                continue
            if text[i] == quote:
                if quote == "'" and text[i + 1:i + 2] == "'":
                    i += 2
                    continue
                return i
            i += 1
        self.fail(line.no, "unterminated quoted string; close the quote on the same line")

    def block_scalar(self, header, line, indent):
        m = re.fullmatch(r"([|>])([-+]?)", header)
        if not m:
            self.fail(line.no, f"unsupported block scalar header {header!r}; use | or >")
        style, chomp = m.groups()
        # Block scalars keep their raw lines, comments and blank lines included.
        start = line.no + 1
        end = start
        body_indent = None
        while end < len(self.raw):
            raw = self.raw[end]
            if raw.strip():
                ind = len(raw) - len(raw.lstrip(" "))
                if ind <= indent:
                    break
                body_indent = ind if body_indent is None else min(body_indent, ind)
            end += 1
        while self.pos < len(self.lines) and self.lines[self.pos].no < end:
            self.pos += 1
        lines = [r[body_indent:] if body_indent else "" for r in self.raw[start:end]]
        while lines and not lines[-1].strip():
            lines.pop()
        trailing = end - start - len(lines)
        if style == "|":
            text = "\n".join(lines)
        else:
            text = ""
            for i, cur in enumerate(lines):
                if i == 0:
                    text = cur
                elif not cur:
                    text += "\n"
                elif lines[i - 1] and not cur.startswith(" ") and not lines[i - 1].startswith(" "):
                    text += " " + cur
                else:
                    text += ("" if text.endswith("\n") else "\n") + cur
        if not lines:
            return ""
        if chomp == "-":
            return text
        if chomp == "+":
            return text + "\n" * (1 + trailing)
        return text + "\n"

    def inline(self, text, line):
        if text[0] in "[{":
            return self.flow(text, line)
        return self.scalar(text, line)

    def flow(self, text, line):
        close = "]" if text[0] == "[" else "}"
        if not text.endswith(close):
            self.fail(line.no, f"flow collection must close with {close!r} on the same line")
        items, cur, quote = [], "", None
        for ch in text[1:-1]:
            if quote:
                cur += ch
                if ch == quote:
                    quote = None
            elif ch in "\"'" and (not cur.strip() or cur.rstrip().endswith(":")):
                quote = ch
                cur += ch
            elif ch in "[]{}":
                self.fail(line.no, "nested flow collections are not supported; use block style")
            elif ch == ",":
                items.append(cur.strip())
                cur = ""
            else:
                cur += ch
        if quote:
            self.fail(line.no, "unterminated quoted string in flow collection")
        if cur.strip():
            items.append(cur.strip())
        elif items:
            pass  # YAML allows one trailing comma
        if close == "]":
            return [self.scalar(item, line) for item in items]
        result = {}
        for item in items:
            split = self._key_split(item, line) if item else None
            if split is None:
                self.fail(line.no, f"expected 'key: value' in flow mapping, got {item!r}")
            key, value = split
            result[key] = self.scalar(value, line) if value else None
        return result

    def scalar(self, text, line):
        if text[0] == '"':
            end = self._quote_end(text, line)
            if text[end + 1:].strip():
                self.fail(line.no, "text after closing quote")
            return self._unescape(text[1:end], line)
        if text[0] == "'":
            end = self._quote_end(text, line)
            if text[end + 1:].strip():
                self.fail(line.no, "text after closing quote")
            return text[1:end].replace("''", "'")
        if text[0] in "&*!%@`" or text.startswith(("---", "...")):
            self.fail(line.no, f"YAML feature {text[:3]!r} is not supported in profiles; quote the value")
        if text in ("~", "null", "Null", "NULL"):
            return None
        if text.lower() in _YAML_BOOLS and text in (text.lower(), text.upper(), text.capitalize()):
            return _YAML_BOOLS[text.lower()]
        if _YAML_INT.fullmatch(text):
            return int(text.replace("_", ""))
        if _YAML_FLOAT.fullmatch(text) and text not in (".", "+.", "-."):
            return float(text.replace("_", ""))
        if text.lower() in (".inf", "+.inf", "-.inf", ".nan"):
            return float(text.lower().replace(".", ""))
        if _YAML_DATE.fullmatch(text) or re.fullmatch(r"0[0-7]+|0x[0-9a-fA-F]+|0b[01]+|[-+]?\d+(:\d+)+", text):
            self.fail(line.no, f"ambiguous value {text!r}; quote it")
        if ": " in text or " #" in text:
            self.fail(line.no, f"plain value {text!r} holds ': '; quote it")
        return text

    def _unescape(self, s, line):
        out, i = [], 0
        while i < len(s):
            ch = s[i]
            if ch != "\\":
                out.append(ch)
                i += 1
                continue
            nxt = s[i + 1:i + 2]
            if nxt in _DQ_ESCAPES:
                out.append(_DQ_ESCAPES[nxt])
                i += 2
            elif nxt in ("x", "u", "U"):
                width = {"x": 2, "u": 4, "U": 8}[nxt]
                digits = s[i + 2:i + 2 + width]
                if not re.fullmatch(r"[0-9a-fA-F]{%d}" % width, digits):
                    self.fail(line.no, f"bad \\{nxt} escape in double-quoted string")
                out.append(chr(int(digits, 16)))
                i += 2 + width
            else:
                self.fail(line.no, f"unknown escape \\{nxt} in double-quoted string")
        return "".join(out)


def parse_frontmatter(text, source="<string>"):
    """Split a profile into (frontmatter dict, body). No frontmatter gives ({}, text)."""
    text = text.replace("\r\n", "\n")
    if not text.startswith("---\n") and text.rstrip("\n") != "---":
        return {}, text
    lines = text.split("\n")
    for end in range(1, len(lines)):
        if lines[end].rstrip() == "---":
            break
    else:
        raise ProfileError(f"{source}:1: frontmatter opened with '---' is never closed; add a '---' line")
    meta = _YamlSubset("\n".join(lines[1:end]), source, 2).parse()
    return meta, "\n".join(lines[end + 1:])


###############################################################################
# Paths and config ############################################################
###############################################################################

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 9889
HOME_SUBDIRS = ("db", "logs", "logs/terminal", "agent-store", "agent-context", "skills", "terminals",
                "flows", "fifos")
# A user switching from upstream keeps the profiles installed there.
UPSTREAM_HOME = Path("~/.aws/cli-agent-orchestrator").expanduser()


def cao_home():
    return Path(os.environ.get("CAO_HOME_DIR") or "~/.cao").expanduser()


# -- file boundaries -----------------------------------------------------------
# cao reads and writes only inside its own folders. A folder root itself may be
# a symlink (a user's choice); a link *inside* it that leads out is refused, and
# so is anything that is not a regular file (a FIFO would hang the reader).

MAX_FILE = 1 << 20


def within(path, root):
    """True when path, with every symlink resolved, is root or lies below it."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def _escape_error(path, root):
    return ConfigError(f"{path} leads out of {root} through a symlink; cao does not follow "
                       "links out of its folders: replace the link with a real file or folder")


def refuse_escape(path, root):
    if not within(path, root):
        raise _escape_error(path, root)


def _opened_path(fd):
    """Where an open fd really is (Linux); None where the platform cannot say."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _open_inside(path, root, flags, mode=0o600):
    refuse_escape(path, root)
    try:
        fd = os.open(os.path.realpath(path), flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:  # swapped for a link after the check above
            raise _escape_error(path, root)
        raise
    where = _opened_path(fd)
    if where is not None and not within(where, root):
        os.close(fd)
        raise _escape_error(path, root)
    return fd


def read_inside(path, root, limit=MAX_FILE):
    """Text of a regular file below root. FileNotFoundError passes through."""
    try:
        fd = _open_inside(path, root, os.O_RDONLY | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(errno.ENOENT, "no such file", str(path))
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}; check the file and its permissions")
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path} is not a regular file; replace it with one")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ConfigError(f"{path} is larger than {limit} bytes; cao reads files up to that size")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8")


def append_inside(path, root):
    """A binary file below root opened for appending, created 0600 if missing."""
    fd = _open_inside(path, root, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"{path} is not a regular file; remove it")
    return os.fdopen(fd, "ab", 0)


def write_inside(path, root, data, mode=0o600):
    """Replace a file below root atomically: a new file in the same folder, then a
    rename over the old name (which replaces a planted link instead of following it)."""
    path = Path(path)
    folder_fd = _open_inside(path.parent, root, os.O_RDONLY | os.O_DIRECTORY)
    tmp = f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode, dir_fd=folder_fd)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path.name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=folder_fd)
        except OSError:
            pass
        raise
    finally:
        os.close(folder_fd)


def ensure_home():
    home = cao_home()
    if not home.is_dir():
        home.mkdir(parents=True, mode=0o700)
    for sub in HOME_SUBDIRS:
        (home / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        refuse_escape(home / sub, home)
    return home


def api_address():
    host = os.environ.get("CAO_API_HOST") or DEFAULT_HOST
    port = os.environ.get("CAO_API_PORT") or str(DEFAULT_PORT)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"CAO_API_PORT={port!r} is not a port; set it to 1-65535")
    return host, int(port)


def load_settings():
    """settings.json as a dict, read again only when the file changes."""
    path = cao_home() / "settings.json"
    try:
        info = os.stat(path)
        identity = (info.st_ino, info.st_size, info.st_mtime_ns)
    except OSError:
        identity = None
    cached = _settings_cache.get(path)
    if cached and cached[0] == identity:
        return cached[1]
    settings = json_object_in(path, lambda p: read_inside(p, cao_home()))
    _settings_cache[path] = (identity, settings)
    return settings


def json_object_in(path, read, parse=json.loads, fix="fix or delete the file"):
    """The JSON object a file holds, {} when there is no file; a ConfigError that
    names the file and the fix when it cannot be read or holds something else."""
    try:
        settings = parse(read(path))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); {fix}")
    if not isinstance(settings, dict):
        raise ConfigError(f"{path}: must hold a JSON object; {fix}")
    return settings


def _zip_archive():
    loader = globals().get("__loader__")
    return loader.archive if isinstance(loader, zipimport.zipimporter) else None


def open_log(name, text=False):
    """A log file in CAO_HOME_DIR/logs, opened for appending."""
    home = ensure_home()
    log = append_inside(home / "logs" / name, home)
    return io.TextIOWrapper(log, encoding="utf-8", errors="replace", write_through=True) \
        if text else log


def _resource_roots():
    # A checkout or zipapp keeps data beside cao.py; a wheel puts it in cao_data/.
    here = os.path.dirname(os.path.abspath(__file__))
    return [here, os.path.join(here, "cao_data")]


def read_resource(relpath):
    """Bytes of a packaged file (web_static/..., profiles/...), or None."""
    archive = _zip_archive()
    if archive:
        import zipfile  # only a zipapp needs it
    for root in _resource_roots():
        if archive:
            inner = os.path.relpath(os.path.join(root, relpath), archive)
            try:
                with zipfile.ZipFile(archive) as z:
                    return z.read(inner.replace(os.sep, "/"))
            except KeyError:
                continue
        path = os.path.join(root, relpath)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                return f.read()
    return None


def list_resources(reldir):
    archive = _zip_archive()
    if archive:
        import zipfile
        with zipfile.ZipFile(archive) as z:
            prefix = reldir.rstrip("/") + "/"
            return sorted(n[len(prefix):] for n in z.namelist()
                          if n.startswith(prefix) and "/" not in n[len(prefix):])
    for root in _resource_roots():
        path = os.path.join(root, reldir)
        if os.path.isdir(path):
            return sorted(os.listdir(path))
    return []


def vendor_target():
    """This interpreter's name among a pyz's vendored targets, e.g. cp311-x86_64."""
    import platform
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(),
                                                          platform.machine().lower())
    try:  # only glibc answers this; the vendored wheels are manylinux (glibc) builds
        libc = "" if os.confstr("CS_GNU_LIBC_VERSION") else "-nonglibc"
    except (ValueError, OSError):
        libc = "-nonglibc"
    kind = "cp" if sys.implementation.name == "cpython" else sys.implementation.name
    version = f"{kind}{sys.version_info[0]}{sys.version_info[1]}"
    return f"{version}-{machine}{libc}" if sys.platform == "linux" else f"{version}-{sys.platform}"


def _vendored_site_packages(archive):
    """Extract, once, the layers of the pyz's _vendor/ that this interpreter's target
    lists to a cache folder keyed by their content; returns that folder, or None."""
    import hashlib
    import zipfile
    with zipfile.ZipFile(archive) as z:
        try:
            targets = json.loads(z.read("_vendor/manifest.json"))["targets"]
        except KeyError:
            return None
        target_name = vendor_target()
        if target_name not in targets:
            raise ConfigError(
                f"this cao.pyz carries mcp for {', '.join(sorted(targets))}, not for this "
                f"Python ({target_name}, {sys.executable}); run it with CPython 3.10-3.13 on "
                "Linux x86_64 or aarch64, or `pip install mcp croniter` for this Python")
        prefixes = tuple(f"_vendor/{n}/" for n in targets[target_name])
        members = [i for i in z.infolist() if i.filename.startswith(prefixes)]
        digest = hashlib.sha256("".join(f"{i.filename}:{i.CRC}" for i in members).encode())
        cache = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "cao"
        target = cache / f"vendor-{digest.hexdigest()[:16]}"
        if not (target / ".complete").exists():
            staging = Path(str(target) + f".{os.getpid()}.tmp")
            for info in members:  # the layers merge into one folder: a package is never split
                info.filename = info.filename.split("/", 2)[2]
                z.extract(info, staging)
            try:
                os.replace(staging, target)
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)  # another process won the race
            (target / ".complete").touch()
    return target


def import_optional(module, purpose):
    """Import a runtime dependency lazily, from site-packages or the pyz's vendored copy."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        pass
    archive = _zip_archive()
    vendor = _vendored_site_packages(archive) if archive else None
    if vendor and str(vendor) not in sys.path:
        sys.path.insert(0, str(vendor))
        try:
            return importlib.import_module(module)
        except ImportError:
            pass
    raise ConfigError(f"{purpose} needs the Python package {module!r}; install it with "
                      f"`pip install {module}` or use a cao.pyz built with --with-mcp")


def self_command():
    """argv that runs this very program (cao.py, cao.pyz or the installed module)."""
    return [sys.executable, _zip_archive() or os.path.abspath(__file__)]


###############################################################################
# Profiles ####################################################################
###############################################################################

ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# cao's own variables, and the loader's, are never set by a request.
_RESERVED_ENV = re.compile(r"CAO_|LD_|DYLD_|TMUX")


def check_env_vars(value, where="env_vars"):
    """{KEY: value} from a dict or KEY=VALUE strings; a bad key or value is an error."""
    if value is None:
        return {}
    if isinstance(value, list):
        pairs = {}
        for item in value:
            key, sep, val = item.partition("=") if isinstance(item, str) else ("", "", "")
            if not sep:
                raise CaoError(f"{where}: {item!r} is not KEY=VALUE")
            pairs[key] = val
        value = pairs
    if not isinstance(value, dict):
        raise CaoError(f"{where} must map names to values, such as {{\"API_MODE\": \"test\"}}")
    for key, val in value.items():
        if not isinstance(key, str) or not ENV_KEY_RE.fullmatch(key):
            raise CaoError(f"{where}: {key!r} is not a variable name (letters, digits, _)")
        if _RESERVED_ENV.match(key):
            raise CaoError(f"{where}: {key} is reserved (CAO_*, LD_*, DYLD_*, TMUX*); pick another name")
        if not isinstance(val, str) or "\0" in val or len(val) > 4096:
            raise CaoError(f"{where}: the value of {key} must be text up to 4096 characters")
    return dict(value)


def _env_file_values():
    values = {}
    try:
        text = read_inside(cao_home() / ".env", cao_home())
    except FileNotFoundError:
        return values
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and not key.startswith("#"):
            values[key.strip()] = value.strip().strip("\"'")
    return values


def save_env_file(values):
    """Set KEY=value lines in ~/.cao/.env (what ${KEY} in profiles reads)."""
    merged = {**_env_file_values(), **values}
    text = "".join(f"{k}={v}\n" for k, v in merged.items())
    write_inside(cao_home() / ".env", cao_home(), text)


def _substitute_vars(text):
    values = {**_env_file_values(), **os.environ}
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                  lambda m: values.get(m.group(1), m.group(0)), text)


def profile_dirs():
    """(folder, root) pairs searched for <name>.md or <name>/agent.md, first match
    wins; no file may lead out of its root."""
    home = cao_home()
    dirs = [(home / "agent-store", home), (home / "agent-context", home),
            (UPSTREAM_HOME / "agent-store", UPSTREAM_HOME),
            (UPSTREAM_HOME / "agent-context", UPSTREAM_HOME)]
    agents = load_settings().get("agents") or {}
    extra = (agents.get("extra_dirs") or []) if isinstance(agents, dict) else None
    if not isinstance(extra, list) or not all(isinstance(d, str) for d in extra):
        raise ConfigError('settings.json: "agents" must be an object whose "extra_dirs" is a '
                          "list of folder paths")
    dirs += [(Path(d).expanduser(),) * 2 for d in extra]
    return dirs


def _find_profile(name):
    _check_profile_name(name)
    for d, root in profile_dirs():
        for path in (d / f"{name}.md", d / name / "agent.md"):
            try:
                return read_inside(path, root), str(path)
            except FileNotFoundError:
                continue
    data = read_resource(f"profiles/{name}.md")
    if data is not None:
        return data.decode("utf-8"), f"built-in:{name}"
    raise NotFound(f"agent profile {name!r} not found; run `cao install {name}` "
                   "or check `GET /agents/profiles`")


def _profile_from_text(text, source, name):
    meta, body = parse_frontmatter(_substitute_vars(text), source)
    profile = dict(meta)
    profile.setdefault("name", name)
    profile.setdefault("description", "")
    profile["system_prompt"] = body.strip()
    profile["source"] = source
    return profile


def load_profile(name):
    text, source = _find_profile(name)
    return _profile_from_text(text, source, name)


def list_profiles():
    seen = {}
    for d, root in profile_dirs():
        if d.is_dir() and within(d, root):
            for entry in sorted(d.iterdir()):
                name = entry.stem if entry.suffix == ".md" else entry.name
                if PROFILE_NAME_RE.fullmatch(name) and name not in seen and (
                        entry.suffix == ".md" or (entry / "agent.md").exists()):
                    seen[name] = str(d)
    for fname in list_resources("profiles"):
        if fname.endswith(".md"):
            seen.setdefault(fname[:-3], "built-in")
    result = []
    for name, label in seen.items():
        try:
            profile = load_profile(name)
            result.append({"name": name, "description": profile.get("description") or "",
                           "provider": profile.get("provider"), "role": profile.get("role"),
                           "source": label})
        except CaoError as e:
            result.append({"name": name, "description": "", "source": label, "error": str(e)})
    return result


PROFILE_URL_HOSTS = ("github.com", "raw.githubusercontent.com")


def _profile_url_hosts():
    extra = [h.strip().lower() for h in os.environ.get("CAO_PROFILE_ALLOWED_HOSTS", "").split(",")
             if h.strip()]
    for host in extra:
        if not HOSTNAME_RE.fullmatch(host):
            raise ConfigError(f"CAO_PROFILE_ALLOWED_HOSTS: {host!r} is not a host name; "
                              "list plain names such as example.com, separated by commas")
    return PROFILE_URL_HOSTS + tuple(extra)


def _check_profile_host(url, allowed):
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" or parts.hostname not in allowed:
        raise CaoError(f"profile URL {url} must be https on {', '.join(allowed)}; "
                       "set CAO_PROFILE_ALLOWED_HOSTS to allow another host")
    return parts


def _fetch_profile_url(url):
    allowed = _profile_url_hosts()
    parts = _check_profile_host(url, allowed)
    if parts.query or parts.fragment or parts.username or not parts.path.endswith(".md"):
        raise CaoError("profile URL must point at a .md file, with no query, fragment or user")
    if parts.hostname == "github.com" and "/blob/" in parts.path:
        owner_repo, _, rest = parts.path.partition("/blob/")
        url = f"https://raw.githubusercontent.com{owner_repo}/{rest}"
    import urllib.request  # only here: it is slow to import

    class SameHostsRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            _check_profile_host(newurl, allowed)  # a redirect may not leave the allowed hosts
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    try:
        with urllib.request.build_opener(SameHostsRedirect).open(url, timeout=30) as resp:
            data = resp.read(MAX_FILE + 1)
    except (OSError, ValueError) as e:
        raise CaoError(f"could not download {url}: {e}")
    if len(data) > MAX_FILE:
        raise CaoError(f"{url} is larger than {MAX_FILE} bytes; a profile is smaller than that")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CaoError(f"{url} is not UTF-8 text; point at the raw Markdown file")


def install_profile(source):
    """Install a profile by built-in name, local .md path or https URL; returns its info."""
    if source.startswith(("https://", "http://")):
        text = _fetch_profile_url(source)
        name = Path(urllib.parse.urlsplit(source).path).stem
        origin = source
    elif source.endswith(".md") or os.sep in source:
        path = Path(source).expanduser()
        if not path.is_file():
            raise NotFound(f"profile file {source} does not exist; check the path")
        text, name, origin = path.read_text(encoding="utf-8"), path.stem, str(path)
    else:
        try:
            text, origin = _find_profile(source)
        except NotFound:
            raise NotFound(f"no built-in or installed profile named {source!r}; pass a .md "
                           "file path or an https URL (see `GET /agents/profiles`)")
        name = source
    _check_profile_name(name)
    profile = _profile_from_text(text, origin, name)
    home = ensure_home()
    for sub in ("agent-store", "agent-context"):
        write_inside(home / sub / f"{name}.md", home, text, mode=0o644)
    unresolved = sorted(set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                                       _substitute_vars(text))))
    return {"name": name, "path": str(home / "agent-store" / f"{name}.md"),
            "provider": profile.get("provider"), "unresolved_vars": unresolved}


###############################################################################
# Client ######################################################################
###############################################################################

# The CLI and the MCP servers reach cao-server only through this class: one
# method per route they use, so no caller builds a path or picks a verb.

DONE_STATUSES = ("completed", "idle", "waiting_user_answer", "error")
# An agent that looks done with no answer on screen may yet draw its turn: a CLI on a
# loaded machine can take a message seconds before it shows it. Seconds to wait for that.
ANSWERLESS_WAIT = 20.0


class Progress:
    """A one-line spinner on stderr while waiting, shown only on a terminal."""

    def __init__(self, label, shown=True):
        self.label, self.started = label, time.monotonic()
        self.tty = shown and sys.stderr.isatty()
        self.frame = 0

    def update(self, status):
        if self.tty:
            self.frame += 1
            spinner = "|/-\\"[self.frame % 4]
            sys.stderr.write(f"\r{spinner} {self.label}: {status} "
                             f"({time.monotonic() - self.started:.0f}s)\x1b[K")
            sys.stderr.flush()

    def done(self):
        if self.tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


class Client:
    """cao-server's REST API at CAO_API_HOST:CAO_API_PORT."""

    # s a refused connection is tried again; `cao mcp` sets it to wait out a server
    # restart. Only a refused one: the request never left, so it cannot run twice.
    patience = 0.0
    _pause = time.sleep

    def __init__(self):
        self.host, self.port = api_address()

    def call(self, method, path, params=None, body=None, timeout=60):
        """One request; returns decoded JSON or raises CaoError with the server's detail."""
        deadline = time.monotonic() + self.patience
        while True:
            try:
                return self._call_once(method, path, params, body, timeout)
            except ConnectionRefusedError:
                if time.monotonic() >= deadline:
                    raise self._not_running() from None
                self._pause(0.25)

    def _not_running(self):
        return ServerUnavailable(f"cao-server is not running at http://{self.host}:{self.port}; "
                                 "start it with `cao-server` (`cao launch` starts one for you)")

    def _call_once(self, method, path, params, body, timeout):
        import http.client  # only a command that talks to the server pays for it
        query = urllib.parse.urlencode({k: v for k, v in (params or {}).items() if v is not None})
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload else {}
            conn.request(method, urllib.parse.quote(path) + ("?" + query if query else ""),
                         body=payload, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except ConnectionRefusedError:
            raise
        except (socket.gaierror, socket.timeout, OSError) as e:
            if isinstance(e, socket.timeout):
                raise ServerUnavailable(f"cao-server at {self.host}:{self.port} did not answer "
                                        f"{method} {path} within {timeout:g} s")
            raise self._not_running()
        finally:
            conn.close()
        try:
            result = json.loads(data) if data else None
        except ValueError:  # not cao's JSON: one line of whatever answered
            result = {"detail": " ".join(data.decode(errors="replace").split())[:200]}
        if resp.status >= 400:
            detail = result.get("detail") if isinstance(result, dict) else str(result)
            if isinstance(detail, dict):
                raise StepFailed(resp.status, **detail)
            error = {403: Forbidden, 404: NotFound, 409: Conflict, 413: TooLarge}.get(
                resp.status, CaoError)
            raise error(detail)
        return result

    # -- routes ------------------------------------------------------------
    def health(self, timeout=60):
        return self.call("GET", "/health", timeout=timeout)

    def sessions(self):
        return self.call("GET", "/sessions")

    def session(self, name):
        return self.call("GET", f"/sessions/{session_name_for(name)}")

    def create_session(self, **body):
        return self.call("POST", "/sessions", body=body, timeout=300)

    def delete_session(self, name):
        return self.call("DELETE", f"/sessions/{session_name_for(name)}", timeout=120)

    def create_terminal(self, session_name, **body):
        return self.call("POST", f"/sessions/{session_name_for(session_name)}/terminals",
                         body=body, timeout=300)

    def terminal(self, terminal_id):
        return self.call("GET", f"/terminals/{check_terminal_id(terminal_id)}")

    def delete_terminal(self, terminal_id):
        return self.call("DELETE", f"/terminals/{check_terminal_id(terminal_id)}")

    def send_input(self, terminal_id, message):
        return self.call("POST", f"/terminals/{check_terminal_id(terminal_id)}/input",
                         body={"message": message})

    def output(self, terminal_id, mode="last"):
        return self.call("GET", f"/terminals/{check_terminal_id(terminal_id)}/output",
                         {"mode": mode})["output"]

    def exit_terminal(self, terminal_id):
        return self.call("POST", f"/terminals/{check_terminal_id(terminal_id)}/exit")

    def resume(self, session_name=None):
        path = f"/sessions/{session_name_for(session_name)}/resume" if session_name \
            else "/sessions/resume"
        return self.call("POST", path, timeout=600)

    def signal(self, terminal_id, status, conversation_id=None):
        body = {"status": status, **({"conversation_id": conversation_id} if conversation_id else {})}
        return self.call("POST", f"/terminals/{check_terminal_id(terminal_id)}/signal",
                         body=body, timeout=5)

    def working_directory(self, terminal_id):
        return self.call("GET", f"/terminals/{check_terminal_id(terminal_id)}/working-directory"
                         )["working_directory"]

    def post_message(self, receiver_id, sender_id, message):
        return self.call("POST", f"/terminals/{check_terminal_id(receiver_id)}/inbox/messages",
                         body={"sender_id": sender_id, "message": message})

    def messages(self, terminal_id, limit=None, status=None):
        return self.call("GET", f"/terminals/{check_terminal_id(terminal_id)}/inbox/messages",
                         {"limit": limit, "status": status})

    def profile(self, name):
        return self.call("GET", f"/agents/profiles/{name}")

    def run_step(self, body, timeout):
        return self.call("POST", "/terminals/run-step", body=body, timeout=timeout)

    def handoff_result(self, job_id):
        return self.call("GET", f"/handoff-results/{job_id}")

    def answer(self, terminal_id, answer):
        return self.call("POST", f"/terminals/{check_terminal_id(terminal_id)}/answer",
                         body={"answer": answer})

    def siblings(self, terminal_id, depth=None, cross_session=False):
        return self.call("GET", f"/terminals/{check_terminal_id(terminal_id)}/siblings",
                         {"depth": depth, "cross_session": "true" if cross_session else None})

    def flows(self):
        return self.call("GET", "/flows")

    def add_flow(self, **flow):
        return self.call("POST", "/flows", body=flow)

    def flow_action(self, name, action):
        """POST /flows/{name}/{run|enable|disable}, or DELETE for remove."""
        if action == "remove":
            return self.call("DELETE", f"/flows/{name}")
        return self.call("POST", f"/flows/{name}/{action}", timeout=300)

    def skills(self):
        return self.call("GET", "/skills")

    def skill(self, name):
        return self.call("GET", f"/skills/{name}")

    def memory_store(self, **body):
        return self.call("POST", "/internal/memory/store", body=body)

    def memory_recall(self, **body):
        return self.call("POST", "/internal/memory/recall", body=body)

    def memory_forget(self, **body):
        return self.call("POST", "/internal/memory/forget", body=body)

    def memories(self, scope=None, memory_type=None, scope_id=None, limit=None):
        return self.call("GET", "/memory", {"scope": scope, "type": memory_type,
                                            "scope_id": scope_id, "limit": limit})

    def memory(self, key, scope=None, scope_id=None):
        return self.call("GET", f"/memory/{key}", {"scope": scope, "scope_id": scope_id})

    def delete_memory(self, key, scope=None, scope_id=None):
        return self.call("DELETE", f"/memory/{key}", {"scope": scope, "scope_id": scope_id})

    def clear_memory(self, scope, scope_id=None):
        return self.call("DELETE", "/memory", {"scope": scope, "scope_id": scope_id})

    def memory_context(self, terminal_id):
        return self.call("GET", f"/terminals/{check_terminal_id(terminal_id)}/memory-context")

    def events(self, after=None, wait=None):
        """Events after cursor `after` (None: only the cursor), waiting up to `wait` s."""
        params = {"after": after, "wait": None if wait is None else f"{wait:.2f}"}
        return self.call("GET", "/events", params, timeout=(wait or 0) + 30)

    def wait_for_status(self, terminal_id, wanted, timeout, label=None, seen=None, deadline=None):
        """Follow /events until the terminal reaches one of `wanted`; returns the status.
        `seen`, a list, gets each status on the way (once per change). `deadline` ends a
        wait that began earlier with `timeout`."""
        progress = Progress(label, shown=label is not None)
        deadline = deadline or time.monotonic() + timeout
        cursor = self.events()["next"]
        try:
            while True:
                status = self.terminal(terminal_id)["status"]
                progress.update(status)
                if seen is not None and (not seen or seen[-1] != status):
                    seen.append(status)
                if status in wanted:
                    return status
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WaitTimeout(f"timed out after {timeout:g} s waiting for terminal "
                                      f"{terminal_id} (status {status}); check it with "
                                      "`cao session status`")
                cursor = self.events(cursor, min(remaining, 2.0 if progress.tty else 20.0))["next"]
        finally:
            progress.done()

    def wait_for_answer(self, terminal_id, timeout, label=None, seen=None):
        """Wait until the terminal is done: (status, its answer or None). An idle or
        completed screen with no answer yet is given ANSWERLESS_WAIT s to start a turn."""
        deadline = time.monotonic() + timeout
        answerless_until = None
        while True:
            status = self.wait_for_status(terminal_id, DONE_STATUSES, timeout, label, seen,
                                          deadline)
            if status not in ("completed", "idle"):
                return status, None
            try:
                return status, self.output(terminal_id, "last")
            except NotFound:
                pass
            answerless_until = answerless_until or min(deadline,
                                                       time.monotonic() + ANSWERLESS_WAIT)
            try:
                self.wait_for_status(terminal_id, ("processing", "waiting_user_answer", "error"),
                                     max(0.0, answerless_until - time.monotonic()), None, seen)
            except WaitTimeout:
                return status, None
            answerless_until = None  # a turn started after all


###############################################################################
# State #######################################################################
###############################################################################

# Each entry migrates the schema one user_version up; never edit a shipped entry.
MIGRATIONS = [
    """
    CREATE TABLE sessions (
        name TEXT PRIMARY KEY, working_directory TEXT, agent_profile TEXT,
        created_at REAL NOT NULL);
    CREATE TABLE terminals (
        id TEXT PRIMARY KEY, session_name TEXT NOT NULL, window_name TEXT NOT NULL,
        pane_id TEXT, provider TEXT NOT NULL, agent_profile TEXT,
        working_directory TEXT, allowed_tools TEXT, caller_id TEXT,
        status TEXT NOT NULL DEFAULT 'unknown', created_at REAL NOT NULL,
        last_active REAL NOT NULL);
    CREATE INDEX terminals_session ON terminals(session_name, created_at);
    CREATE TABLE inbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT, sender_id TEXT NOT NULL,
        receiver_id TEXT NOT NULL, message TEXT NOT NULL, status TEXT NOT NULL,
        reason TEXT, created_at REAL NOT NULL, delivered_at REAL);
    CREATE INDEX inbox_receiver ON inbox(receiver_id, status, id);
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, kind TEXT NOT NULL,
        session_name TEXT, terminal_id TEXT, data TEXT);
    """,
    "ALTER TABLE inbox ADD COLUMN batch_id INTEGER;",
    """
    CREATE TABLE memories (
        id INTEGER PRIMARY KEY AUTOINCREMENT, scope TEXT NOT NULL, scope_id TEXT NOT NULL,
        key TEXT NOT NULL, memory_type TEXT NOT NULL, content TEXT NOT NULL,
        tags TEXT NOT NULL DEFAULT '', source_provider TEXT, source_terminal TEXT,
        created_at REAL NOT NULL, updated_at REAL NOT NULL,
        access_count INTEGER NOT NULL DEFAULT 0, last_recalled REAL,
        UNIQUE(scope, scope_id, key));
    CREATE INDEX memories_recent ON memories(scope, scope_id, updated_at);
    ALTER TABLE terminals ADD COLUMN memory_context TEXT;
    UPDATE terminals SET memory_context = '';
    """,
    """
    ALTER TABLE terminals ADD COLUMN description TEXT;
    ALTER TABLE terminals ADD COLUMN model TEXT;
    ALTER TABLE terminals ADD COLUMN worktree TEXT;
    CREATE TABLE handoff_jobs (
        job_id TEXT PRIMARY KEY, caller_id TEXT, terminal_id TEXT, agent_profile TEXT,
        state TEXT NOT NULL, last_message TEXT, error_message TEXT,
        created_at REAL NOT NULL, finished_at REAL);
    """,
    """
    ALTER TABLE sessions ADD COLUMN env_vars TEXT;
    ALTER TABLE terminals ADD COLUMN initial_delivery TEXT;
    """,
    """
    CREATE TABLE flows (
        name TEXT PRIMARY KEY, file_path TEXT NOT NULL, schedule TEXT NOT NULL,
        agent_profile TEXT NOT NULL, provider TEXT, script TEXT,
        enabled INTEGER NOT NULL DEFAULT 1, last_run REAL, last_result TEXT,
        last_reason TEXT, next_run REAL);
    """,
    """
    ALTER TABLE terminals ADD COLUMN conversation_id TEXT;
    ALTER TABLE terminals ADD COLUMN lost TEXT;
    ALTER TABLE terminals ADD COLUMN resumed TEXT;
    ALTER TABLE handoff_jobs ADD COLUMN prompt TEXT;
    ALTER TABLE handoff_jobs ADD COLUMN submitted INTEGER NOT NULL DEFAULT 1;
    """,
    """
    ALTER TABLE handoff_jobs ADD COLUMN teardown INTEGER NOT NULL DEFAULT 0;
    """,
]
EVENTS_KEPT = 10000       # events kept for /events readers
EVENTS_HELD_MAX = 500000  # events kept at most for a plugin that has not read them yet


class Store:
    """The sqlite database. One connection behind a lock; WAL keeps readers cheap
    and makes every committed row survive a kill -9 of the server."""

    def __init__(self, path):
        import sqlite3  # the server's; a CLI command does not load it
        self.path = str(path)
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=5000")
        try:
            os.chmod(self.path, 0o600)
        except OSError:
            pass
        self._migrate()
        self._emits = 0
        self.holds = {}  # reader -> the last event it has handled; pruning spares the rest

    def _migrate(self):
        with self.lock:
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise ConfigError(f"{self.path} was written by a newer cao (schema {version}); upgrade cao")
            for number in range(version, len(MIGRATIONS)):
                self.db.executescript("BEGIN;" + MIGRATIONS[number]
                                      + f";PRAGMA user_version={number + 1};COMMIT;")

    def query(self, sql, args=()):
        with self.lock:
            return [dict(r) for r in self.db.execute(sql, args).fetchall()]

    def one(self, sql, args=()):
        rows = self.query(sql, args)
        return rows[0] if rows else None

    def insert(self, sql, args=()):
        """Run one INSERT; returns the new row's id."""
        with self.lock:
            return self.db.execute(sql, args).lastrowid

    def execute(self, sql, args=()):
        """Run one statement; returns the number of rows it changed."""
        with self.lock:
            return self.db.execute(sql, args).rowcount

    def emit(self, kind, session_name=None, terminal_id=None, **data):
        """Record an event and wake every long-poll waiter."""
        with self.lock:
            seq = self.db.execute(
                "INSERT INTO events(ts, kind, session_name, terminal_id, data) VALUES (?,?,?,?,?)",
                (time.time(), kind, session_name, terminal_id, json.dumps(data))).lastrowid
            self._emits += 1
            if self._emits % 500 == 0:
                floor = min([seq - EVENTS_KEPT, *self.holds.values()])
                self.db.execute("DELETE FROM events WHERE seq <= ?",
                                (max(floor, seq - EVENTS_HELD_MAX),))
            self.changed.notify_all()
            return seq

    def wake(self):
        """Wake every wait_until() waiter to look again (a change outside the database)."""
        with self.lock:
            self.changed.notify_all()

    def last_event_seq(self):
        return self.one("SELECT COALESCE(MAX(seq), 0) AS seq FROM events")["seq"]

    def events_after(self, after, wait=0.0, limit=500):
        deadline = time.monotonic() + wait
        with self.lock:
            while True:
                rows = self.query("SELECT * FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                                  (after, limit))
                remaining = deadline - time.monotonic()
                if rows or remaining <= 0:
                    break
                self.changed.wait(remaining)
        for row in rows:
            row["data"] = json.loads(row["data"] or "{}")
        return rows

    def wait_until(self, predicate, timeout):
        """Block until predicate() is true (checked on every change) or timeout; returns it."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                value = predicate()
                remaining = deadline - time.monotonic()
                if value or remaining <= 0:
                    return value
                self.changed.wait(remaining)

    def close(self):
        with self.lock:
            self.db.close()


class Bus:
    """In-process listeners for what happens to terminals ("status",
    "terminal_removed"): features subscribe here instead of being called from the
    terminals code. A listener runs in the thread that published."""

    def __init__(self):
        self.listeners = {}

    def subscribe(self, kind, listener):
        self.listeners.setdefault(kind, []).append(listener)

    def publish(self, kind, **data):
        for listener in self.listeners.get(kind, ()):
            listener(**data)


###############################################################################
# Tmux ########################################################################
###############################################################################

def tmux_argv(*args):
    sock = os.environ.get("CAO_TMUX_SOCKET")
    return ["tmux"] + (["-L", sock] if sock else []) + [str(a) for a in args]


TMUX_TIMEOUT = 30  # s; a hung tmux server must not hang a request or the pane watcher


def _tmux_run(args, input=None):
    try:
        return subprocess.run(tmux_argv(*args), input=input, capture_output=True,
                              timeout=TMUX_TIMEOUT)
    except FileNotFoundError:
        raise TmuxError("tmux is not installed; install it (apt install tmux / brew install tmux)")
    except subprocess.TimeoutExpired:
        raise TmuxError(f"tmux {args[0]} did not answer within {TMUX_TIMEOUT} s")


def tmux(*args, input=None, check=True):
    """Run one tmux command (chain more with ';' arguments); returns stdout text."""
    result = _tmux_run(args, input)
    if check and result.returncode:
        err = result.stderr.decode(errors="replace").strip()
        raise TmuxError(f"tmux {args[0]} failed: {err or 'exit ' + str(result.returncode)}")
    return result.stdout.decode(errors="replace")


def tmux_literal(text):
    """text for an argument tmux expands as a format (-c, pipe-pane's command): there
    `#(...)` would run a shell command, so every # is doubled to stand for itself."""
    return text.replace("#", "##")


def tmux_spawn(session, window, cwd, env, argv, new_session):
    """Start argv in a new detached 220x50 window (and session); returns the pane id."""
    env_args = [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
    if new_session:
        head = ["new-session", "-d", "-s", session, "-x", 220, "-y", 50]
    else:
        head = ["new-window", "-d", "-t", f"={session}:"]
    pane_id = tmux(*head, "-n", window, "-c", tmux_literal(cwd), *env_args, "-P", "-F", "#{pane_id}",
                "--", *argv).strip()
    # Keep a dead pane on screen so its last words can be read and its status is error.
    try:
        tmux("set-option", "-w", "-t", pane_id, "remain-on-exit", "on", ";",
             "set-option", "-w", "-t", pane_id, "allow-rename", "off")
    except TmuxError:
        raise CaoError(f"the agent command exited as soon as it started; check that "
                       f"`{shlex.join(argv)}` runs in {cwd}")
    return pane_id


def tmux_capture(pane_id, history=None):
    """The pane's text; history=None gives the visible screen, 'all' everything."""
    args = ["capture-pane", "-p", "-J", "-t", pane_id]
    if history == "all":
        args += ["-S", "-", "-E", "-"]
    elif history:
        args += ["-S", -int(history)]
    return tmux(*args)


def tmux_screen(pane_id):
    """(visible screen with its colour escapes, cursor (x, y), size (cols, rows))."""
    out = tmux("capture-pane", "-p", "-e", "-t", pane_id, ";", "display-message", "-p", "-t",
               pane_id, "#{cursor_x} #{cursor_y} #{pane_width} #{pane_height}")
    screen, _, last = out.rstrip("\n").rpartition("\n")
    x, y, cols, rows = (int(n) for n in last.split())
    return screen, (x, y), (cols, rows)


def tmux_capture_state(pane_id):
    """(screen text, pane_dead) in one tmux call; None when the pane is gone."""
    marker = f"cao-end-{uuid.uuid4().hex}:"  # printable: tmux 3.5 prints \x1f as \037
    result = _tmux_run(("capture-pane", "-p", "-J", "-t", pane_id, ";",
                        "display-message", "-p", "-t", pane_id, marker + "#{pane_dead}"))
    if result.returncode:
        return None
    text = result.stdout.decode(errors="replace")
    screen, _, dead = text.rpartition(marker)
    return screen, dead.strip() == "1"


def tmux_paste(pane_id, text, keep_buffer=None):
    """Paste text as one bracketed paste (tmux adds the markers if the app asked).
    With keep_buffer, a buffer of that name is set in the same command list as the
    paste, so its existence proves the paste happened (loading from stdin is
    asynchronous in tmux, so the text goes in by a separate, finished call)."""
    buf = "cao-" + uuid.uuid4().hex[:12]
    tmux("load-buffer", "-b", buf, "-", input=text.encode())
    marker = [";", "set-buffer", "-b", keep_buffer, "pasted"] if keep_buffer else []
    tmux("paste-buffer", "-p", "-d", "-b", buf, "-t", pane_id, *marker)


def tmux_buffer_exists(name):
    return name in tmux("list-buffers", "-F", "#{buffer_name}", check=False).split()


def tmux_keys(pane_id, *keys):
    tmux("send-keys", "-t", pane_id, *keys)


def tmux_pane_info(pane_id, fmt):
    try:
        return tmux("display-message", "-p", "-t", pane_id, fmt).strip()
    except TmuxError:
        return None


def tmux_list_panes():
    """{pane_id: {session, window, dead}} of every pane on the server."""
    out = tmux("list-panes", "-a", "-F",
               "#{pane_id}\t#{session_name}\t#{window_name}\t#{pane_dead}", check=False)
    panes = {}
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 4:
            panes[parts[0]] = {"session": parts[1], "window": parts[2], "dead": parts[3] == "1"}
    return panes


def tmux_sessions():
    """{name: attached_clients} of every tmux session on the server."""
    out = tmux("list-sessions", "-F", "#{session_name}\t#{session_attached}", check=False)
    return {n: int(a or 0) for n, _, a in (l.partition("\t") for l in out.splitlines()) if n}


def tmux_pipe(pane_id, fifo):
    """Stream the pane's output into fifo (replacing any older pipe)."""
    tmux("pipe-pane", "-t", pane_id, ";", "pipe-pane", "-t", pane_id,
         tmux_literal("exec cat >> " + shlex.quote(str(fifo))))


###############################################################################
# Providers ###################################################################
###############################################################################

# A provider is data: how to launch its CLI from a profile, how its screen looks
# in each state, where its last answer is, how to get past its first-run dialogs
# and how to make it exit. The logic that uses these fields lives once, here and
# in the terminals section; the table itself is at the end of this file. Users
# add or override entries under "providers" in settings.json with the same
# fields (PROVIDER_FIELDS below).
#
# Templates are strings with {field}s: profile, terminal_id, system_prompt,
# model, working_directory, context_dir, mcp_command, hook_command (strings);
# cao, mcp_args, mcp_argv, hook, disallowed_tools (lists); mcp_env, mcp_servers (objects).
# A string that is exactly one list or object field becomes that value (a list
# splices into argv). {"json": value} and {"toml": value}, with an optional
# "prefix", render a structure after filling its fields. Native signals: a CLI
# that runs `{hook} <status>` when its turn starts, ends or needs approval (Claude
# Code hooks, Codex notify) tells cao its state beside the screen.

NO_ANSWER_WAIT = 1.0  # s a completed screen with no answer on it waits for one to be drawn
STATUSES = ("idle", "processing", "completed", "waiting_user_answer", "error", "unknown")
READY_STATUSES = ("idle", "completed", "waiting_user_answer")
LAUNCH_FIELDS = ("profile", "system_prompt", "model", "terminal_id", "working_directory",
                 "context_dir", "mcp_command", "hook_command", "cao", "mcp_args", "mcp_argv", "hook",
                 "disallowed_tools", "mcp_env", "mcp_servers", "skills_dir", "conversation_id")
FEATURES = ("always", "system_prompt", "model", "yolo", "restricted", "skills",
            "new_conversation", "resume")
CAO_MCP_NAME = "cao-mcp-server"
# `@builtin` names Kiro's own tool set; it grants nothing beyond the tools listed with it,
# so upstream's reviewer role (@builtin, fs_read, fs_list) stays read-only everywhere.
TOOL_GROUPS = {"fs_*": ("fs_read", "fs_write", "fs_list"), "@builtin": ()}
CAO_TOOLS = ("execute_bash", "fs_read", "fs_write", "fs_list", "web_fetch", "discovery")
BUILTIN_TOOLS = ("execute_bash", "fs_read", "fs_write", "fs_list", "web_fetch")
DEFAULT_ROLE = "developer"  # a profile with neither role nor allowedTools
ROLE_TOOLS = {"supervisor": ["@cao-mcp-server", "fs_read", "fs_list"],
              "reviewer": ["@builtin", "fs_read", "fs_list", "@cao-mcp-server"],
              "developer": ["@builtin", "fs_*", "execute_bash", "web_fetch", "@cao-mcp-server"],
              "workflow_scout": ["@builtin", "fs_read", "execute_bash", "@cao-mcp-server"]}
_MCP_SERVER_TOOL = re.compile(r"@[A-Za-z0-9_.-]{1,64}")
_TEMPLATE_FIELD = re.compile(r"\{([a-z_]+)\}")
def _template_strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _template_strings(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _template_strings(item)


# -- the field schema ------------------------------------------------------------
# Each field of a provider entry: a check that returns what is wrong with a value
# (or None) and what the field means. _check_provider validates every entry,
# built in or from settings.json, with it; a test keeps docs/providers.md in step.

def _problem_regex(pattern):
    try:
        re.compile(pattern, re.M)
    except (re.error, TypeError) as e:
        return f"bad regex {pattern!r}: {e}"
    return None


def _problem_templates(value):
    for template in _template_strings(value):
        names = set(_TEMPLATE_FIELD.findall(template)) - set(LAUNCH_FIELDS)
        if names:
            return (f"template {template!r} uses {', '.join(sorted(names))}; "
                    f"known fields: {', '.join(LAUNCH_FIELDS)}")
    return None


def _is(kind, what):
    return lambda value: None if isinstance(value, kind) else f"must be {what}"


def _first_run(value):
    if not isinstance(value, dict) or set(value) != {"file", "done", "json"} or \
            not str(value["file"]).startswith("~/") or not isinstance(value["json"], dict) or \
            value["done"] not in value["json"]:
        return 'must be {"file": "~/path", "done": "<a key of json>", "json": {...}}'
    return None


def _login(value):
    if not isinstance(value, dict) or set(value) != {"file", "env", "argv"} or \
            not str(value["file"]).startswith("~/") or not isinstance(value["env"], str) or \
            not isinstance(value["argv"], list) or not all(isinstance(a, str) for a in value["argv"]):
        return 'must be {"file": "~/path", "env": "NAME", "argv": ["login", ...]}'
    return None


def _credentials(value):
    if not isinstance(value, dict) or set(value) - {"env", "files", "fix"} or not all(
            isinstance(v, list) and all(isinstance(x, str) for x in v)
            for k, v in value.items() if k != "fix") or not isinstance(value.get("fix", ""), str):
        return 'must be {"env": [names], "files": ["~/path", ...], "fix": "text"}'
    return None


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return f"must be a number >= 0, not {value!r}"
    return None


def _argv(value):
    if not (isinstance(value, list) and value):
        return "must be a non-empty list"
    return _problem_templates(value)


def _feature_argv(value):
    if not isinstance(value, dict) or set(value) - set(FEATURES):
        return f"must map features ({', '.join(FEATURES)}) to argv lists"
    return _problem_templates(value)


def _templates_by_name(value):
    return _problem_templates(value) if isinstance(value, dict) else "must be an object"


def _home_overlay(value):
    if not isinstance(value, dict) or not {"env", "dir", "json"} <= set(value) <= \
            {"env", "dir", "json", "when_env"} or not isinstance(value["json"], dict) or \
            not all(isinstance(value[k], str) and value[k] for k in ("env", "dir")) or \
            "/" in value["dir"] or value["dir"] in (".", "..") or \
            not all(isinstance(v, dict) and set(v) <= set(value["json"])
                    for v in value.get("when_env", {}).values()):
        return ('must be {"env": NAME, "dir": ".folder", "json": {"file.json": {...}}, '
                '"when_env": {VARIABLE: {"file.json": {...}}}}')
    return _problem_templates(value["json"])


def _status_patterns(value):
    for status, pattern in value:
        if status not in STATUSES:
            return f"status {status!r} is not one of {', '.join(STATUSES)}"
        if _problem_regex(pattern):
            return _problem_regex(pattern)
    return None


def _answer_rules(value):
    if not isinstance(value, dict) or not {"start", "end"} <= set(value):
        return 'must be an object with "start" and "end" regexes'
    return next(filter(None, (_problem_regex(value[k]) for k in ("start", "end", "trim")
                              if k in value)), None)


def _still_in_input(spec, screen, needle):
    """Whether the input box still holds the message: its last words, or the
    placeholder a CLI shows for a paste ("[Pasted text #1 +4 lines]")."""
    tail = _screen_tail(screen, spec.get("input_lines", 1))
    marker = spec.get("paste_marker")
    return needle in tail or bool(marker and re.search(marker, tail))


def _dialogs(value):
    return next(filter(None, (_problem_regex(pattern) for pattern, _ in value)), None)


PROVIDER_FIELDS = {
    "description": (_is(str, "a string"), "free text for listings"),
    "command": (_argv, "argv template list; the first word is the CLI"),
    "binary": (_is(str, "a string"), "executable that must be on PATH (default: command[0])"),
    "install": (_is(str, "a string"), "the install command shown when the binary is missing"),
    "args": (_feature_argv, "{feature: [argv templates]} appended when the feature is on"),
    "env": (_templates_by_name, "{NAME: template} for the CLI; {when, value} per feature"),
    "files": (_templates_by_name, "{name: template} written into the terminal's own directory"),
    "tools": (_is(dict, "an object"), "{cao tool: [the CLI's own names]} for native restrictions"),
    "status": (_status_patterns, "ordered [status, regex] pairs; the first match wins"),
    "tail_lines": (_number, "how many non-empty screen lines the patterns see"),
    "answer": (_answer_rules, "start/end regexes (keep_start, trim, skip_open) of the answer"),
    "dialogs": (_dialogs, "[regex, [keys]] first-run questions answered with tmux keys"),
    "exit": (_is(dict, 'an object: {"keys": [...]} or {"text": "/exit"}'), "how to make it exit"),
    "submit": (_is(dict, 'an object: {"enter_delay": seconds}'), "seconds between paste and Enter"),
    "input_lines": (_number, "bottom lines that hold the input box (text left there gets an Enter)"),
    "settle": (_number, "seconds a new completed answer must stay unchanged"),
    "turn_start_grace": (_number, "seconds after a submit in which idle/completed is the old turn"),
    "mcp_server_keys": (_is(dict, 'an object, e.g. {"timeout": 86400000}'),
                        "extra keys for cao's own entry in {mcp_servers}"),
    "eager_input": (_is(bool, "true or false"), "the CLI queues input typed while it works"),
    "skills_dir": (_is(str, "a path template"), "the CLI's own skill folder for this terminal"),
    "paste_marker": (_problem_regex, "regex of what the input box shows for pasted text"),
    "first_run": (_first_run, '{"file": "~/path", "done": key, "json": {...}}: what the CLI '
                              'writes when a person finishes first-run screens that cannot pass '
                              'headless; cao writes it into a HOME that has no such file'),
    "login": (_login, '{"file": "~/path", "env": NAME, "argv": [...]}: the CLI\'s own login '
                      'command, run with $NAME on stdin when HOME has no such file'),
    "credentials": (_credentials, '{"env": [names], "files": ["~/path"], "fix": "how to get '
                                  'some"}: where the CLI finds a login, for `cao doctor`'),
    "json_env": (_is(list, "a list of variable names"), "variables of the provider's env that "
                 "hold JSON: merged over the user's own value of the variable, not replacing it"),
    "home_overlay": (_home_overlay, '{"env": NAME, "dir": ".folder", "json": {file: {...}}}: '
                                    "for a CLI that ignores settings files a user may write "
                                    "(Gemini CLI): $NAME points at a home of the terminal's own "
                                    "whose folder links to the user's, each file in json merged "
                                    "over the user's copy, when_env's under it while VARIABLE "
                                    "is set"),
    "login_screen": (_problem_regex, "regex of a screen that asks for a login: the terminal "
                                     "is an error, and its start fails with credentials.fix"),
}


def _check_provider(name, spec, origin):
    unknown = set(spec) - set(PROVIDER_FIELDS)
    if unknown:
        raise ConfigError(f"{origin}: provider {name!r}: unknown field(s) "
                          f"{', '.join(sorted(unknown))}; allowed: {', '.join(PROVIDER_FIELDS)}")
    if "command" not in spec:
        raise ConfigError(f'{origin}: provider {name!r}: "command" must be a non-empty list')
    for field, value in spec.items():
        problem = PROVIDER_FIELDS[field][0](value)
        if problem:
            raise ConfigError(f'{origin}: provider {name!r}: "{field}" {problem}')
    return spec


_providers_cache = [None, None]  # [settings it was built from, table]


def providers():
    """The provider table: built-ins plus valid entries from settings.json (built
    again only when settings.json changed)."""
    settings = load_settings()
    if _providers_cache[0] is settings:
        return _providers_cache[1]
    table = dict(PROVIDERS)
    user = settings.get("providers", {})
    if not isinstance(user, dict):
        raise ConfigError(f"{cao_home() / 'settings.json'}: \"providers\" must be an object")
    for name, spec in user.items():
        if not NAME_RE.fullmatch(name) or not isinstance(spec, dict):
            raise ConfigError(f"settings.json: provider {name!r} needs a simple name and an object")
        table[name] = _check_provider(name, {**table.get(name, {}), **spec}, "settings.json")
    _providers_cache[:] = [settings, table]
    return table


def get_provider(name):
    table = providers()
    if name not in table:
        raise CaoError(f"unknown provider {name!r}; choose one of: {', '.join(sorted(table))}")
    return table[name]


def provider_binary(spec):
    first = spec["command"][0]
    return spec.get("binary") or (None if first == "{cao}" else first)


def provider_installed(spec):
    binary = provider_binary(spec)
    return binary is None or shutil.which(binary) is not None


def prepare_first_run(name, spec):
    _login_once(name, spec)
    _first_run_file(name, spec)


def _login_once(name, spec):
    """A CLI that shows a sign-in screen until its own login command has run (Codex, even
    with OPENAI_API_KEY set) gets that command, with the key on stdin, once per HOME."""
    login = spec.get("login")
    key = os.environ.get(login["env"]) if login else None
    if not key or Path(login["file"]).expanduser().exists():
        return
    binary = shutil.which(provider_binary(spec)) or provider_binary(spec)
    try:
        done = subprocess.run([binary, *login["argv"]], input=key, text=True, capture_output=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CaoError(f"{name}: `{provider_binary(spec)} {' '.join(login['argv'])}` failed ({e}); "
                       f"run it yourself with ${login['env']} on stdin")
    if done.returncode:
        why = _screen_tail(done.stderr or done.stdout, 1)
        raise CaoError(f"{name}: `{provider_binary(spec)} {' '.join(login['argv'])}` exited with "
                       f"{done.returncode} ({why}); check ${login['env']}")
    print(f"cao: {name}: this HOME had no {login['file']}; ran `{provider_binary(spec)} "
          f"{' '.join(login['argv'])}` with ${login['env']} on stdin", file=sys.stderr, flush=True)


def _first_run_file(name, spec):
    """Tell a CLI its first run is done the way it tells itself, where its first-run
    screens cannot pass headless (Claude Code's check of api.anthropic.com): the keys it
    writes when a person finishes them, into a file that does not exist yet. An
    existing file is never rewritten; one without the `done` key is an error."""
    first = spec.get("first_run")
    if not first:
        return
    path = Path(first["file"]).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        data = None
    except (OSError, ValueError):
        data = {}
    if data is not None:
        if not isinstance(data, dict) or not data.get(first["done"]):
            raise CaoError(f"{name} has not finished its first run in this HOME: {first['file']} "
                           f"has no {first['done']}; run `{provider_binary(spec)}` once and finish "
                           f"its screens, or remove {first['file']} so that cao writes it")
        return
    version = re.search(r"\d+(?:\.\d+)+", command_version(
        [shutil.which(provider_binary(spec)) or provider_binary(spec), "--version"]) or "")
    values = {key: (version[0] if version else None) if value == "{cli_version}" else value
              for key, value in first["json"].items()}
    values = {key: value for key, value in values.items() if value is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # O_EXCL: a file the CLI made meanwhile is the CLI's, not ours to replace
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(values, f, indent=2)
    print(f"cao: {name}: this HOME had no {first['file']}; wrote {json.dumps(values)} into it, as "
          f"{provider_binary(spec)} does when a person finishes its first-run screens",
          file=sys.stderr, flush=True)


def check_tool_names(tools, where):
    """Every name must be cao's vocabulary: an unknown name is an error, never ignored."""
    for name in tools:
        if name != "*" and name not in CAO_TOOLS and name not in TOOL_GROUPS \
                and not _MCP_SERVER_TOOL.fullmatch(name):
            raise ConfigError(f"{where}: unknown tool {name!r}; use {', '.join(CAO_TOOLS)}, "
                              f"{', '.join(TOOL_GROUPS)}, @<mcp server name> or *")
    return tools


def roles():
    """Role name -> allowed tools: the built-ins, then settings.json's `agents.roles`
    (or upstream's older top-level `roles`)."""
    settings = load_settings()
    agents = settings.get("agents") or {}
    table = dict(ROLE_TOOLS)
    for where, custom in (("roles", settings.get("roles")),
                          ("agents.roles", agents.get("roles") if isinstance(agents, dict) else None)):
        if custom is None:
            continue
        if not isinstance(custom, dict):
            raise ConfigError(f"settings.json: {where} must map role names to lists of tools")
        for name, tools in custom.items():
            if not (isinstance(tools, list) and tools and all(isinstance(t, str) for t in tools)):
                raise ConfigError(f"settings.json: {where}.{name} must be a non-empty list of "
                                  "tool names, such as [\"fs_read\", \"fs_list\"]")
            table[name] = check_tool_names(tools, f"settings.json: {where}.{name}")
    return table


def role_tools(role):
    """The tools of a role; an unknown role is an error, never "no restriction"."""
    table = roles()
    if not isinstance(role, str) or role not in table:
        raise ConfigError(f"unknown role {role!r}; use one of {', '.join(sorted(table))}, or "
                          "define it in settings.json under agents.roles")
    return table[role]


def resolve_tools(allowed):
    """cao tool names (groups expanded) from an allowedTools list."""
    names = set()
    for item in allowed:
        names.update(TOOL_GROUPS.get(item, (item,)))
    return names


def profile_tools(profile, override=None, parent=None):
    """The one tool list a terminal runs with: an explicit list (request or
    --allowed-tools), else the profile's allowedTools, else its role's; a profile that
    states neither gets the developer role, narrowed to its parent's tools when a
    terminal started it. The profile's own MCP servers are added as @name."""
    if override is not None:
        tools = parse_allowed_tools(override)
    elif profile.get("allowedTools") is not None:
        tools = parse_allowed_tools(profile["allowedTools"])
    elif profile.get("role") is not None:
        tools = list(role_tools(profile["role"]))
    else:
        tools = list(role_tools(DEFAULT_ROLE))
        if parent is not None and "*" not in parent:
            granted = resolve_tools(parent)
            tools = [t for t in sorted(resolve_tools(tools)) if t in granted]
    if "*" in tools:
        return ["*"]
    servers = profile.get("mcpServers") or {}
    return tools + [f"@{name}" for name in servers if name != CAO_MCP_NAME
                    and _MCP_SERVER_TOOL.fullmatch(f"@{name}") and f"@{name}" not in tools]


def tool_enforcement(spec, tools):
    """How a provider keeps an agent to its tools: none (nothing is denied), hard (the
    CLI is not offered the others) or soft (the agent is told)."""
    if tools == ["*"] or resolve_tools(tools) >= set(BUILTIN_TOOLS):
        return "none"
    return "hard" if spec.get("tools") else "soft"


def _toml(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


def _fill(value, fields):
    """A template with its {field}s filled in; see Templates above."""
    if isinstance(value, str):
        whole = _TEMPLATE_FIELD.fullmatch(value)
        if whole and whole.group(1) in fields and not isinstance(fields[whole.group(1)], str):
            return fields[whole.group(1)]

        def text(m):
            v = fields.get(m.group(1))
            return m.group(0) if v is None else ",".join(v) if isinstance(v, list) else str(v)
        return _TEMPLATE_FIELD.sub(text, value)
    if isinstance(value, list):
        out = []
        for item in value:
            filled = _fill(item, fields)
            out.extend(filled) if isinstance(item, str) and isinstance(filled, list) \
                else out.append(filled)
        return out
    if isinstance(value, dict):
        if "json" in value:
            return value.get("prefix", "") + json.dumps(_fill(value["json"], fields),
                                                        ensure_ascii=False)
        if "toml" in value:
            return value.get("prefix", "") + _toml(_fill(value["toml"], fields))
        return {k: _fill(v, fields) for k, v in value.items()}
    return value


def _on(value, active):
    """Unwrap {"when": feature, "value": v}: v when the feature is on, else None."""
    if isinstance(value, dict) and "when" in value:
        return value["value"] if value["when"] in active else None
    return value


def launch_plan(spec, fields):
    """(argv, env, files) for a provider and the launch fields of one terminal."""
    active = {"always"} | {f for f in FEATURES if fields.get(f)}
    argv = _fill(list(spec["command"]), fields)
    for feature, template in spec.get("args", {}).items():
        if feature in active:
            argv += _fill(list(template), fields)
    def chosen(table):
        return {k: str(_fill(_on(t, active), fields)) for k, t in table.items()
                if _on(t, active) is not None}
    return [str(a) for a in argv], chosen(spec.get("env", {})), chosen(spec.get("files", {}))


def _json_with_comments(text):
    """Parse JSON that may hold // and /* */ comments (as Gemini's settings may)."""
    out, i, n = [], 0, len(text)
    while i < n:
        if text[i] == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        elif text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
        else:
            out.append(text[i])
            i += 1
    return json.loads("".join(out))


def _merged(theirs, ours):
    """ours over theirs, object by object; lists are joined without repeats."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        return {**theirs, **{k: _merged(theirs.get(k), v) for k, v in ours.items()}}
    if isinstance(theirs, list) and isinstance(ours, list):
        return theirs + [v for v in ours if v not in theirs]
    return ours


def _json_over_users(name, theirs, ours):
    """cao's JSON for an environment variable merged over the user's own value."""
    if not theirs:
        return ours
    try:
        settings = json.loads(theirs)
    except ValueError as e:
        raise ConfigError(f"${name} is not JSON ({e}); fix it or unset it")
    if not isinstance(settings, dict):
        raise ConfigError(f"${name} holds no JSON object; fix it or unset it")
    return json.dumps(_merged(settings, json.loads(ours)), ensure_ascii=False)


def build_home_overlay(overlay, fields, context_dir, user_home, cao_home, env):
    """A home of the terminal's own for a CLI that reads its settings only from there:
    each entry of the user's folder is linked in (logins, history stay shared) and each
    settings file is the user's copy with cao's merged over it. `when_env` holds what
    the CLI writes when a person answers a first-run screen that the variable already
    answers (Gemini's login picker with GEMINI_API_KEY set); the user's own choice wins
    over it. Returns the env for the CLI."""
    root = Path(context_dir) / "home"
    folder, theirs = root / overlay["dir"], Path(user_home) / overlay["dir"]
    folder.mkdir(parents=True, exist_ok=True)
    if theirs.is_dir():
        for entry in theirs.iterdir():
            link = folder / entry.name
            if entry.name not in overlay["json"] and not link.is_symlink() and not link.exists():
                link.symlink_to(entry)  # made before, when the terminal was resumed
    for name, template in overlay["json"].items():
        settings = json_object_in(theirs / name, lambda p: p.read_text(encoding="utf-8"),
                                  lambda text: _json_with_comments(text) if text.strip() else {},
                                  "fix it or move it away")
        for variable, files in overlay.get("when_env", {}).items():
            if env.get(variable) and name in files:
                settings = _merged(files[name], settings)
        write_inside(folder / name, cao_home,
                     json.dumps(_merged(settings, _fill(template, fields)), indent=2))
    return {overlay["env"]: str(root)}


def _screen_tail(screen, count):
    lines = [line.rstrip() for line in screen.split("\n")]
    return "\n".join([line for line in lines if line][-count:])


def _input_tail(message):
    """What of a sent message shows in an input box: the end of its last line."""
    return message.strip().split("\n")[-1].strip()[-24:]


def _login_match(spec, tail):
    return spec.get("login_screen") and re.search(spec["login_screen"], tail, re.M)


def login_asked(spec, screen):
    """The line where the CLI asks for a login (it found no credentials), or None."""
    tail = _screen_tail(screen, spec.get("tail_lines", 15))
    found = _login_match(spec, tail)
    if not found:
        return None
    line = tail[tail.rfind("\n", 0, found.start()) + 1:].split("\n")[0]
    return " ".join(line.split()).strip("│⎿✗ ") or found.group(0)


def login_problem(provider, screen):
    """One line saying that an agent's CLI asks for a login, and the fix; or None."""
    spec = providers().get(provider, {})
    asked = login_asked(spec, screen)
    if not asked:
        return None
    fix = spec.get("credentials", {}).get("fix") or \
        f"run `{provider_binary(spec)}` once by hand and log in"
    return (f"{provider} has no credentials here (its screen says \"{asked}\"): {fix}; "
            "`cao doctor` checks every provider")


def detect_status(spec, screen):
    tail = _screen_tail(screen, spec.get("tail_lines", 15))
    if _login_match(spec, tail):
        return "error"
    for status, pattern in spec.get("status", []):
        if re.search(pattern, tail, re.M):
            return status
    return "unknown"


def _with_native(native, screen):
    """Combine what the CLI reported with what its screen shows. The screen decides
    whenever it is recognised: a CLI may report done while it still draws its
    answer (Codex). The CLI's own word settles a screen no pattern recognises,
    such as a redraw after a CLI update."""
    return native if native and screen == "unknown" else screen


def pending_dialog(spec, screen):
    """The keys that answer a first-run dialog shown on screen, or None."""
    tail = _screen_tail(screen, 20)
    for pattern, keys in spec.get("dialogs", []):
        if re.search(pattern, tail, re.M):
            return keys
    return None


def extract_answer(spec, text):
    """The last answer on a screen/scrollback, or None when none is there or the
    newest one has no end line below it yet (unless answer.skip_open)."""
    answer = spec.get("answer")
    if not answer:
        return None
    trim = re.compile(answer["trim"]) if answer.get("trim") else None
    lines = [(trim.sub("", line) if trim else line).rstrip() for line in text.split("\n")]
    start_re, end_re = re.compile(answer["start"]), re.compile(answer["end"])
    end = None
    for i in range(len(lines) - 1, -1, -1):
        is_end = end_re.search(lines[i])
        if start_re.search(lines[i]) and (end is not None or not is_end):
            if end is not None:
                return _answer_text(lines, i, end, start_re if answer.get("keep_start") else None)
            if not answer.get("skip_open"):
                return None  # the newest answer is still being drawn; never an older one
        if is_end:
            end = i
    return None


def _answer_text(lines, start, end, marker):
    if marker is None:
        body = lines[start + 1:end]
    else:
        first = lines[start]
        indent = marker.search(first).end()
        body = [first[indent:]] + [line[indent:] if line[:indent].strip() == "" else line
                                   for line in lines[start + 1:end]]
    text = textwrap.dedent("\n".join(body)).strip("\n")
    return text or None


###############################################################################
# Terminals ###################################################################
###############################################################################

# Where an agent may not work (paths after resolving symlinks). A system tree is
# refused with everything below it, except scratch space and the user's own home
# (a service account's home may sit in /var); a shared root only by itself.
SYSTEM_TREES = ("/bin", "/sbin", "/usr", "/etc", "/var", "/dev", "/proc", "/sys", "/boot", "/lib",
                "/lib32", "/lib64", "/libx32", "/run", "/snap", "/root", "/System", "/Library",
                "/private/etc", "/private/var")
SCRATCH_TREES = ("/tmp", "/var/tmp", "/private/tmp", "/private/var/tmp", "/private/var/folders")
SHARED_ROOTS = ("/", "/home", "/Users", "/mnt", "/media", "/opt", "/srv", "/private")
HOME_PARENTS = ("/home", "/Users")
SUBMIT_PATIENCE = 10.0  # s of Enters for a message still in the input line
MAX_ANSWER = 4000
ANSWER_KEY_RE = re.compile(r"[0-9yYnN]|Enter|Escape|Up|Down|Tab")
KEY_RE = re.compile(r"(?:Up|Down|Left|Right|Enter|Tab|Escape|Space|BSpace|[A-Za-z0-9]|[CMS]-[A-Za-z0-9])")
WINDOW_ENV_KEYS = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "LC_CTYPE", "SHELL",
                   "SSH_AUTH_SOCK", "XDG_RUNTIME_DIR")
DEFAULT_PROVIDER = "demo"


def _below(path, tree):
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def _home_of(path, own_home):
    """The home directory path lies in, or None."""
    if own_home != "/" and _below(path, own_home):
        return own_home
    parts = path.split("/")
    if len(parts) > 2 and "/" + parts[1] in HOME_PARENTS:
        return "/".join(parts[:3])
    return "/root" if _below(path, "/root") else None


def workdir_refusal(path):
    """Why an agent may not work in path (already resolved), or None."""
    import tempfile  # here, not at the top: it imports random and hashlib
    own_home = os.path.realpath(os.path.expanduser("~"))
    scratch = SCRATCH_TREES + (os.path.realpath(tempfile.gettempdir()),)
    if path in SHARED_ROOTS or path in scratch:
        return "a shared system directory"
    if _below(path, os.path.realpath(cao_home())):
        return "cao's own directory"
    home = _home_of(path, own_home)
    if home and path != home and path[len(home) + 1:].startswith("."):
        return "a hidden directory in a home directory (configuration and credentials live there)"
    if home == own_home or any(_below(path, s) for s in scratch):
        return None
    if any(_below(path, tree) for tree in SYSTEM_TREES):
        return "a system directory"
    return None


def resolve_working_directory(path):
    if path is not None and (not isinstance(path, str) or not path.strip()):
        raise CaoError("working_directory is empty; omit it to use the current folder")
    path = os.path.realpath(os.path.expanduser(path or os.getcwd()))
    if not os.path.isdir(path):
        raise CaoError(f"working directory {path} does not exist; create it or pass another one")
    why = workdir_refusal(path)
    if why:
        raise CaoError(f"working directory {path} is {why}; use a project directory")
    return path


MAX_MESSAGE = 256 << 10  # bytes of UTF-8; a message is pasted into a terminal


def check_message(message):
    if not isinstance(message, str) or not message.strip():
        raise CaoError("message is empty; pass the text to send")
    size = len(message.encode("utf-8", "surrogatepass"))
    if size > MAX_MESSAGE:
        raise TooLarge(f"message is {size} bytes, over the limit of {MAX_MESSAGE}; write the "
                       "text to a file in the working directory and send its path")
    return message


def parse_allowed_tools(value):
    if value is None:
        return None
    tools = value if isinstance(value, list) else str(value).split(",")
    tools = [t.strip() for t in tools if isinstance(t, str) and t.strip()]
    if not tools or any(len(t) > 128 for t in tools):
        raise CaoError("allowed_tools must be a comma-separated list of tool names, or *")
    return check_tool_names(tools, "allowed_tools")


class _WatchedPane:
    """A pane the watcher reads: its FIFO, process fd, log and output timing."""

    __slots__ = ("terminal_id", "pane_id", "fifo", "fd", "pidfd", "log", "dirty_since",
                 "last_output", "outputs", "eof", "eof_checks", "followed_at")

    def __init__(self, terminal_id, pane_id, fifo, log):
        self.terminal_id, self.pane_id, self.fifo, self.log = terminal_id, pane_id, fifo, log
        self.fd, self.pidfd, self.dirty_since, self.last_output, self.outputs = None, None, None, 0.0, 0
        self.eof, self.eof_checks = False, 0
        self.followed_at = time.monotonic()


class PaneWatcher(threading.Thread):
    """One thread for all panes: reads each pane's pipe-pane FIFO with a selector
    and, once a pane's output settles, calls refresh(terminal_id) to re-read its
    screen. An idle pane costs nothing; there is no per-terminal poll loop."""

    QUIET = 0.010       # re-read a screen once its output paused this long ...
    MAX_DELAY = 0.1     # ... or at least this often while it keeps printing

    def __init__(self, fifo_dir, log_dir, refresh):
        super().__init__(name="cao-status", daemon=True)
        self.fifo_dir, self.log_dir, self.refresh = Path(fifo_dir), Path(log_dir), refresh
        self.selector = selectors.DefaultSelector()
        self.panes = {}
        self.ops = []
        self.cond = threading.Condition()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        self.selector.register(self.wake_r, selectors.EVENT_READ, None)
        self.stopping = False

    def _queue(self, op, *args):
        with self.cond:
            self.ops.append((op, args))
        os.write(self.wake_w, b"x")

    def add(self, terminal_id, pane_id):
        self._queue(self._add, terminal_id, pane_id)

    def remove(self, terminal_id):
        self._queue(self._remove, terminal_id)

    def poke(self, terminal_id):
        """Re-read this terminal's screen soon even if it printed nothing."""
        self._queue(self._mark_dirty, terminal_id)

    def stop(self):
        self.stopping = True
        os.write(self.wake_w, b"x")

    def output_count(self, terminal_id):
        pane = self.panes.get(terminal_id)
        return pane.outputs if pane else 0

    def quiet_for(self, terminal_id):
        """Seconds since the pane last printed, or since it was followed if it printed
        nothing since (its first screen may come before the pipe); 0 if not followed."""
        pane = self.panes.get(terminal_id)
        return time.monotonic() - max(pane.last_output, pane.followed_at) if pane else 0.0

    def wait_settled(self, terminal_id, after_count, quiet=0.08, timeout=1.0):
        """Wait until the pane printed something after after_count and then went quiet."""
        return bool(self.wait_any_settled({terminal_id: after_count}, quiet, timeout))

    def wait_any_settled(self, counts, quiet=0.08, timeout=1.0):
        """Wait until panes printed something after their counts ({terminal id: count})
        and then went quiet; returns those ids, or [] at the timeout or when all are gone."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                now = time.monotonic()
                panes = [p for p in map(self.panes.get, counts) if p is not None]
                if not panes or now >= deadline:
                    return []
                moved = [p for p in panes if p.outputs > counts[p.terminal_id]]
                settled = [p.terminal_id for p in moved if now - p.last_output >= quiet]
                if settled:
                    return settled
                wait = min([deadline - now] + [quiet - (now - p.last_output) for p in moved])
                self.cond.wait(max(wait, 0.005))

    def _add(self, terminal_id, pane_id):
        self._remove(terminal_id)
        fifo = self.fifo_dir / f"{terminal_id}.fifo"
        if not os.path.lexists(fifo):
            os.mkfifo(fifo, 0o600)
        pane = _WatchedPane(terminal_id, pane_id, fifo,
                     append_inside(self.log_dir / f"{terminal_id}.log", self.log_dir))
        pane.fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        if not stat.S_ISFIFO(os.fstat(pane.fd).st_mode):
            os.close(pane.fd)
            raise ConfigError(f"{fifo} is not a FIFO that cao made; remove it")
        self.selector.register(pane.fd, selectors.EVENT_READ, pane)
        self.panes[terminal_id] = pane
        try:
            tmux_pipe(pane_id, fifo)
        except TmuxError:
            pass  # the pane is gone already; the refresh below notices
        self._watch_process(pane)
        self._mark_dirty(terminal_id)

    def _watch_process(self, pane):
        # A dead pane keeps its pipe open and may print nothing, so watch the
        # agent process itself: a pidfd becomes readable when it exits (Linux).
        pid = tmux_pane_info(pane.pane_id, "#{pane_pid}")
        try:
            pane.pidfd = os.pidfd_open(int(pid))
        except (AttributeError, OSError, TypeError, ValueError):
            return
        self.selector.register(pane.pidfd, selectors.EVENT_READ, pane)

    def _close_fd(self, pane):
        if pane.fd is not None:
            self.selector.unregister(pane.fd)
            os.close(pane.fd)
            pane.fd = None

    def _close_pidfd(self, pane):
        if pane.pidfd is not None:
            self.selector.unregister(pane.pidfd)
            os.close(pane.pidfd)
            pane.pidfd = None

    def _remove(self, terminal_id):
        pane = self.panes.pop(terminal_id, None)
        if pane:
            self._close_fd(pane)
            self._close_pidfd(pane)
            pane.log.close()
            try:
                pane.fifo.unlink()
            except OSError:
                pass

    def _mark_dirty(self, terminal_id, now=None):
        pane = self.panes.get(terminal_id)
        if pane and pane.dirty_since is None:
            pane.dirty_since = now or time.monotonic()

    def _read(self, pane):
        try:
            data = os.read(pane.fd, 65536)
        except BlockingIOError:
            return
        now = time.monotonic()
        if not data:
            # The pipe closed: the pane died, vanished, or its pipe was replaced.
            self._close_fd(pane)
            pane.eof = True
        else:
            pane.log.write(data)
        with self.cond:
            pane.outputs += 1
            pane.last_output = now
            self.cond.notify_all()
        self._mark_dirty(pane.terminal_id, now)

    def _due(self, now):
        due, wait = [], None
        for pane in self.panes.values():
            if pane.dirty_since is None:
                continue
            at = min(max(pane.last_output + self.QUIET, pane.dirty_since),
                     pane.dirty_since + self.MAX_DELAY)
            if at <= now:
                due.append(pane)
            else:
                wait = at - now if wait is None else min(wait, at - now)
        return due, wait

    def run(self):
        while not self.stopping:
            with self.cond:
                ops, self.ops = self.ops, []
            for op, args in ops:
                op(*args)
            due, wait = self._due(time.monotonic())
            for pane in due:
                pane.dirty_since = None
                try:
                    self.refresh(pane.terminal_id)
                except Exception:
                    traceback.print_exc()
            if due:
                continue
            for key, _ in self.selector.select(wait):
                if key.data is None:
                    try:
                        os.read(self.wake_r, 4096)
                    except BlockingIOError:
                        pass
                elif key.fd == key.data.pidfd:
                    self._close_pidfd(key.data)
                    self._mark_dirty(key.data.terminal_id)
                else:
                    self._read(key.data)
        for terminal_id in list(self.panes):
            self._remove(terminal_id)

    def rearm(self, terminal_id):
        """Called (in this thread) when a pane whose pipe closed still looks alive."""
        pane = self.panes.get(terminal_id)
        if not (pane and pane.eof):
            return
        pane.eof_checks += 1
        if pane.eof_checks <= 5:
            # tmux closes the pipe a moment before it marks the pane dead: look again.
            pane.dirty_since = time.monotonic() + 0.05 * pane.eof_checks
        else:
            self._add(terminal_id, pane.pane_id)  # the pipe was replaced; take it back


MODEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")
MAX_DESCRIPTION = 500


def check_model(model):
    if not isinstance(model, str) or not MODEL_RE.fullmatch(model):
        raise CaoError(f"model {model!r} is not a model id; use letters, digits and ._:/@+- "
                       "(up to 128), such as claude-sonnet-4-5")
    return model


def check_description(description):
    if description is None:
        return None
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
        raise CaoError(f"description must be text of at most {MAX_DESCRIPTION} characters")
    return " ".join(description.split()) or None


def _git(*args, cwd=None):
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CaoError(f"git {args[0]} failed: {e}")
    return done


def worktree_add(workdir, path, branch):
    """A git worktree of workdir's repository at path, on a new branch from its HEAD."""
    top = _git("rev-parse", "--show-toplevel", cwd=workdir)
    if top.returncode != 0:
        raise CaoError(f"use_worktree needs a git repository, and {workdir} is not in one; "
                       "run `git init` there or leave use_worktree off")
    path.parent.mkdir(parents=True, exist_ok=True)
    done = _git("worktree", "add", "-q", "-b", branch, str(path), "HEAD", cwd=workdir)
    if done.returncode != 0:
        raise CaoError(f"git worktree add failed: {' '.join(done.stderr.split())[:300]}")
    return {"path": str(path), "repo": top.stdout.strip(), "branch": branch}


def worktree_remove(worktree):
    """Remove a worker's worktree; its branch is kept only if it has commits of its own."""
    repo = worktree["repo"]
    _git("worktree", "remove", "--force", worktree["path"], cwd=repo)
    _git("branch", "-d", worktree["branch"], cwd=repo)  # -d refuses a branch with new work


class Terminal:
    """What cao knows of one live terminal between screen reads. The database row
    holds what must outlive the server; this record is rebuilt at start."""

    __slots__ = ("id", "status", "input_gen", "input_lock", "native", "submitted_at",
                 "turn_seen", "unsent", "poke_due", "settling", "dialog_keys_at", "mcp_wait")

    def __init__(self, terminal_id):
        self.id, self.status = terminal_id, "unknown"
        self.input_gen = 0               # bumped by each submitted input
        self.input_lock = threading.Lock()
        self.native = None               # the status the CLI itself reported (hooks, notify)
        self.mcp_wait = None             # until when its first input waits for `cao mcp`
        self.submitted_at = None         # when its last input was submitted (monotonic)
        self.turn_seen = False           # its screen showed the turn since that submit
        self.unsent = None               # [tail of the last input, Enters re-sent, when]
        self.poke_due = None             # when its pending re-read timer fires
        self.settling = None             # (answer on its new completed screen, since when)
        self.dialog_keys_at = 0.0        # when a first-run dialog was last answered

    def submitted_wall(self):
        """When its last input was submitted, as time.time() (None if it had none)."""
        return None if self.submitted_at is None else \
            time.time() - (time.monotonic() - self.submitted_at)


def terminal_row(store, terminal_id):
    check_terminal_id(terminal_id)
    row = store.one("SELECT * FROM terminals WHERE id = ?", (terminal_id,))
    if not row:
        raise NotFound(f"terminal {terminal_id} not found; list terminals with GET /sessions/<name>")
    return row


def tmux_died_under(store, terminal_id):
    """Whether the terminal's tmux session is gone (tmux killed, machine restarted)."""
    row = store.one("SELECT session_name, lost FROM terminals WHERE id = ?", (terminal_id,))
    return bool(row) and (bool(row["lost"]) or row["session_name"] not in tmux_sessions())


BUSY_STATUSES = ("processing", "waiting_user_answer")


def turn_cut(lost):
    """Whether a lost terminal was in the middle of a turn, or had just been given one:
    that turn is gone."""
    return bool(lost) and json.loads(lost).get("cut", False)


def _lost_json(lost):
    if not lost:
        return None
    lost = json.loads(lost)
    return {"since": _iso(lost["at"]), "reason": lost["reason"]}


def _live(live, terminal_id):
    term = live.get(terminal_id)
    if term is None:
        raise NotFound(f"terminal {terminal_id} is being removed")
    return term


class StatusTracker:
    """Decides each terminal's status from its screen, read once its pane settles
    (in the pane watcher's thread), and from what the CLI reports itself."""

    def __init__(self, store, bus, live, watcher, gone):
        self.store, self.bus, self.live, self.watcher = store, bus, live, watcher
        self.gone = gone  # gone(terminal_id, reason): the terminal's window has vanished

    def status(self, terminal_id):
        term = self.live.get(terminal_id)
        return term.status if term else None

    def refresh(self, terminal_id):
        """Re-read a pane's screen and update the terminal's status."""
        row = self.store.one("SELECT pane_id, provider, session_name FROM terminals WHERE id = ?",
                             (terminal_id,))
        term = self.live.get(terminal_id)
        if not row or term is None:
            self.watcher.remove(terminal_id)
            return
        gen = term.input_gen
        try:
            state = tmux_capture_state(row["pane_id"])
        except TmuxError:
            self.poke_later(term, 1.0)  # tmux is busy or stuck: look again, never hang
            return
        if state is None:
            self.gone(terminal_id, "its tmux window was closed")
            return
        screen, dead = state
        if dead:
            status = "error"
        else:
            try:
                spec = get_provider(row["provider"])
            except CaoError:
                spec = {}
            if self._answer_dialog(term, spec, row["pane_id"], screen):
                return
            status = _with_native(term.native, detect_status(spec, screen))
            if status in BUSY_STATUSES:
                term.turn_seen, term.unsent = True, None
            elif not term.turn_seen:
                self._resend_enter(term, spec, row["pane_id"], screen)
            grace = spec.get("turn_start_grace", 0)
            since = time.monotonic() - (term.submitted_at if term.submitted_at is not None
                                        else -grace)
            if status in ("idle", "completed") and not term.turn_seen and since < grace:
                # Some CLIs clear the input before they draw their spinner, and the
                # last turn's answer is still on screen: until the new turn shows,
                # idle or completed is the old screen.
                status = "processing"
                self.poke_later(term, grace - since)
            self.watcher.rearm(terminal_id)
        if gen != term.input_gen:
            self.watcher.poke(terminal_id)  # input arrived meanwhile; this screen is stale
            return
        if status == "completed" and not self._answer_settled(term, spec, screen):
            return
        if status == "unknown" and term.status != "unknown":
            return
        self.set_status(term, status, row["session_name"])

    def _answer_settled(self, term, spec, screen):
        """A new completed screen counts once its answer is drawn and has stayed the
        same for the provider's `settle` seconds: opencode draws its done line before
        the answer, Copilot CLI clears its busy footer before the answer's last words.
        A done screen that shows no answer at all counts after NO_ANSWER_WAIT."""
        if term.status == "completed" or not spec.get("answer"):
            return True
        answer, now = extract_answer(spec, screen), time.monotonic()
        if term.settling is None or term.settling[0] != answer:
            term.settling = (answer, now)
        hold = NO_ANSWER_WAIT if answer is None else spec.get("settle", 0)
        wait = term.settling[1] + hold - now
        if wait <= 0:
            term.settling = None
            return True
        self.poke_later(term, wait)
        return False

    def _resend_enter(self, term, spec, pane_id, screen):
        """An Enter that arrived inside the paste burst can be taken as part of the
        paste (Gemini CLI, now and then): the text then waits in the input box
        after the submit looked. Press Enter again, up to 3 times, 1 s apart."""
        unsent = term.unsent
        if not unsent or not _still_in_input(spec, screen, unsent[0]):
            return
        wait = unsent[2] + 1.0 - time.monotonic()
        if unsent[1] >= 3 or wait > 0:
            if unsent[1] < 3:
                self.poke_later(term, wait)
            return
        unsent[1:] = [unsent[1] + 1, time.monotonic()]
        tmux_keys(pane_id, "Enter")

    def poke_later(self, term, delay):
        """Re-read the screen after delay even if the pane prints nothing (one timer)."""
        due = time.monotonic() + delay
        if term.poke_due is not None and term.poke_due <= due:
            return
        term.poke_due = due

        def poke():
            if term.poke_due == due:
                term.poke_due = None
            self.watcher.poke(term.id)
        timer = threading.Timer(delay, poke)
        timer.daemon = True
        timer.start()

    def _answer_dialog(self, term, spec, pane_id, screen):
        """Answer a first-run question (trust this folder...) as a person would."""
        keys = pending_dialog(spec, screen)
        if keys is None:
            return False
        if time.monotonic() - term.dialog_keys_at > 1.0:
            term.dialog_keys_at = time.monotonic()
            for key in keys:
                tmux_keys(pane_id, key)
        self.watcher.poke(term.id)
        return True

    def resume(self, session_name=None):
        path = f"/sessions/{session_name_for(session_name)}/resume" if session_name \
            else "/sessions/resume"
        return self.call("POST", path, timeout=600)

    def signal(self, terminal_id, status):
        """A state the CLI reported itself (Claude Code hook, Codex notify), or
        mcp_ready from the terminal's `cao mcp`."""
        if status not in ("processing", "completed", "waiting_user_answer", "mcp_ready"):
            raise CaoError(f"unknown signal {status!r}; use processing, completed, "
                           "waiting_user_answer or mcp_ready")
        terminal_row(self.store, terminal_id)
        if status == "mcp_ready":
            _live(self.live, terminal_id).mcp_wait = None
            self.store.wake()
            return
        _live(self.live, terminal_id).native = status
        self.watcher.poke(terminal_id)

    def set_status(self, term, status, session_name):
        with self.store.lock:
            previous = term.status
            if previous == status:
                return
            term.status = status
            self.store.execute("UPDATE terminals SET status = ?, last_active = ? WHERE id = ?",
                               (status, time.time(), term.id))
            self.store.emit("status", session_name, term.id, status=status, previous=previous)
        self.bus.publish("status", terminal_id=term.id, status=status)

    def screen(self, terminal_id):
        row = self.store.one("SELECT pane_id FROM terminals WHERE id = ?", (terminal_id,))
        state = tmux_capture_state(row["pane_id"]) if row and row["pane_id"] else None
        return state[0] if state else ""

    def _raise_if_login_asked(self, terminal_id):
        row = self.store.one("SELECT provider FROM terminals WHERE id = ?", (terminal_id,))
        problem = row and login_problem(row["provider"], self.screen(terminal_id))
        if problem:
            raise NeedsLogin(problem)

    def wait_ready(self, terminal_id, timeout):
        """Wait until the agent shows a ready screen; an agent that dies is an error."""
        self.store.wait_until(lambda: self.status(terminal_id) in READY_STATUSES + ("error", None),
                              timeout)
        status = self.status(terminal_id)
        if status == "error":
            self._raise_if_login_asked(terminal_id)
        if status is None and tmux_died_under(self.store, terminal_id):
            raise TmuxError(f"tmux died while the agent in terminal {terminal_id} was starting "
                            "(tmux server killed or machine restarted)")
        if status == "error" or status is None:
            tail = " | ".join(_screen_tail(self.screen(terminal_id), 3).split("\n"))
            raise CaoError(f"agent in terminal {terminal_id} exited while starting; its screen "
                           f"ends: {tail or '(empty)'}")
        return status


MAX_TYPED = 4096
MAX_SCREENS = 64  # terminals one GET /screens may follow
_LITERAL = object()
_TYPED_TOKEN_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z~]|\x1bO[A-Za-z]|\x1b[\x20-\x7e]|"
                             r"[\x00-\x1f\x7f]|[^\x00-\x1f\x7f]+")
_TYPED_KEYS = {"\r": "Enter", "\n": "Enter", "\t": "Tab", "\x7f": "BSpace", "\x08": "BSpace",
               "\x1b": "Escape", "\x00": "C-Space", "\x1b[Z": "BTab"}
_CSI_KEYS = {"A": "Up", "B": "Down", "C": "Right", "D": "Left", "H": "Home", "F": "End",
             "P": "F1", "Q": "F2", "R": "F3", "S": "F4", "2~": "IC", "3~": "DC",
             "5~": "PPage", "6~": "NPage"}
_CSI_MODIFIERS = {"2": "S-", "3": "M-", "4": "M-S-", "5": "C-", "6": "C-S-", "7": "C-M-"}


def _typed_key(token):
    """The tmux key for one token of typed data, _LITERAL for plain text, None if unknown."""
    if token in _TYPED_KEYS:
        return _TYPED_KEYS[token]
    if not token.startswith("\x1b"):
        code = ord(token[0])
        return f"C-{chr(code + 96)}" if len(token) == 1 and code < 0x20 else _LITERAL
    csi = re.fullmatch(r"\x1b[\[O](?:1;([2-7]))?([A-HPQRS])|\x1b\[([2356])(?:;([2-7]))?~", token)
    if csi:
        name = _CSI_KEYS[csi[2] or csi[3] + "~"]
        return _CSI_MODIFIERS.get(csi[1] or csi[4], "") + name
    if len(token) == 2 and token[1] not in "[O":
        return "M-" + token[1]  # Alt with a key
    return None


class TerminalInput:
    """Types into terminals: a message as one bracketed paste and Enter, confirmed
    taken; single keys; the provider's way to exit."""

    def __init__(self, store, live, watcher, tracker):
        self.store, self.live, self.watcher, self.tracker = store, live, watcher, tracker
        self.first_input = None  # (row, message) -> the message a terminal gets first

    def send(self, terminal_id, message, keep_buffer=None, only_if=None):
        """Paste message as one bracketed paste, press Enter, and confirm the agent took it.
        only_if() is asked again once this input's turn comes (other input may have
        gone first and made the agent busy); False raises Busy."""
        check_message(message)
        row = terminal_row(self.store, terminal_id)
        if row["memory_context"] is None and self.first_input:
            message = self.first_input(row, message)
        term = _live(self.live, terminal_id)
        if term.status == "error":
            raise Conflict(f"terminal {terminal_id}'s agent has exited (status error); "
                           "start a new terminal")
        if term.mcp_wait:  # a CLI asked before cao's tools connect answers without them
            self.store.wait_until(lambda: term.mcp_wait is None,
                                  max(0.0, term.mcp_wait - time.monotonic()))
            term.mcp_wait = None
        spec = get_provider(row["provider"])
        pane_id = row["pane_id"]
        with term.input_lock:
            if only_if and not only_if():
                raise Busy(f"terminal {terminal_id} turned {term.status} before the input "
                           "could be typed")
            tmux_paste(pane_id, message, keep_buffer)
            try:
                delay = spec.get("submit", {}).get("enter_delay", 0)
                if delay:
                    time.sleep(delay)  # some CLIs treat an Enter inside the paste burst as a newline
                self._submit(term, pane_id, spec, message, enter_first=True)
            except CaoError as e:
                e.pasted = True  # the agent has the text: a caller must not paste it again
                raise
            self._submitted(term, row["session_name"], message)
        self.store.execute("UPDATE terminals SET last_active = ? WHERE id = ?",
                           (time.time(), terminal_id))

    def _submit(self, term, pane_id, spec, message, enter_first):
        """Press Enter until the message has left the agent's input line. A CLI that is
        still settling in (connecting its MCP servers on a loaded machine) can drop an
        Enter or two, so it gets SUBMIT_PATIENCE seconds, about one Enter a second."""
        needle = _input_tail(message)
        deadline, attempt, pressed_at = time.monotonic() + SUBMIT_PATIENCE, 0, 0.0
        while attempt < 3 or time.monotonic() < deadline:
            count = self.watcher.output_count(term.id)
            if attempt >= 3:  # past the quick tries: an Enter a second, or none if it went
                self.watcher.wait_settled(term.id, count, 0.01,
                                          max(0.0, pressed_at + 1.0 - time.monotonic()))
                count = self.watcher.output_count(term.id)
                if self._input_taken(term.id, pane_id, spec, needle, count, False):
                    return
            pressed = enter_first or attempt > 0
            if pressed:
                tmux_keys(pane_id, "Enter")
                pressed_at = time.monotonic()
            if self._input_taken(term.id, pane_id, spec, needle, count, pressed):
                return
            attempt += 1
        raise Conflict(f"terminal {term.id} did not take the input: it is still in the agent's "
                       f"input line after {attempt} Enters in {SUBMIT_PATIENCE:g} s; "
                       "look with tmux attach")

    def _input_taken(self, terminal_id, pane_id, spec, needle, count, pressed):
        """After an Enter, look at each burst of output: True as soon as the message has
        left the input line (or the agent looks busy); False at once if the Enter drew
        nothing, else once 1 s passed with the message still there. An agent that
        reacted gets the whole second: Claude Code took 0.3 s to draw its approval
        prompt, and an Enter pressed again meanwhile answered the prompt Yes."""
        deadline = time.monotonic() + 1.0
        while True:
            printed = pressed and self.watcher.wait_settled(
                terminal_id, count, quiet=0.01, timeout=max(0.0, deadline - time.monotonic()))
            count = self.watcher.output_count(terminal_id)
            state = tmux_capture_state(pane_id)
            if state is None or state[1]:
                raise Conflict(f"terminal {terminal_id}'s agent exited before taking the input")
            if not _still_in_input(spec, state[0], needle) or \
                    detect_status(spec, state[0]) == "processing":
                return True
            left = deadline - time.monotonic()
            if not printed or left <= 0 or not self.watcher.wait_settled(
                    terminal_id, count, quiet=0.0, timeout=left):
                return False

    def _submitted(self, term, session_name, message):
        """The agent took new input: it is busy until its screen says otherwise."""
        term.input_gen += 1
        term.native = None
        term.submitted_at = time.monotonic()
        term.turn_seen, term.settling = False, None
        term.unsent = [_input_tail(message), 0, time.monotonic()]
        self.tracker.set_status(term, "processing", session_name)
        self.watcher.poke(term.id)

    def ensure_submitted(self, terminal_id, message):
        """After a crash between paste and Enter: submit the text if it still waits."""
        row = terminal_row(self.store, terminal_id)
        term = _live(self.live, terminal_id)
        with term.input_lock:
            self._submit(term, row["pane_id"], get_provider(row["provider"]), message,
                         enter_first=False)
            self._submitted(term, row["session_name"], message)

    def answer(self, terminal_id, answer):
        """Answer a terminal that is waiting on a question: a key for a choice, else text."""
        if not isinstance(answer, str) or not answer.strip() or len(answer) > MAX_ANSWER:
            raise CaoError(f"answer must be non-empty text of at most {MAX_ANSWER} characters")
        status = self.tracker.status(terminal_row(self.store, terminal_id)["id"])
        if status != "waiting_user_answer":
            raise Conflict(f"terminal {terminal_id} is {status}, not waiting_user_answer; "
                           "there is no question to answer")
        if ANSWER_KEY_RE.fullmatch(answer.strip()):
            self.send_key(terminal_id, answer.strip())
            self.watcher.poke(terminal_id)
        else:
            self.send(terminal_id, answer)
        return {"success": True, "terminal_id": terminal_id, "status": "answered",
                "message": f"answered terminal {terminal_id}"}

    def send_key(self, terminal_id, key):
        if not isinstance(key, str) or not KEY_RE.fullmatch(key):
            raise CaoError(f"unsupported key {key!r}; use a tmux key name such as Enter, "
                           "Escape, Down, Tab, C-c or a single character")
        tmux_keys(terminal_row(self.store, terminal_id)["pane_id"], key)

    def type_keys(self, terminal_id, data):
        """Keys as a terminal emulator sends them (text, \r, \x03, escape sequences):
        text is typed literally, everything else as the tmux key it stands for."""
        if not isinstance(data, str) or not data or len(data) > MAX_TYPED:
            raise CaoError(f"data must be 1 to {MAX_TYPED} characters typed into the terminal")
        commands = []
        for token in _TYPED_TOKEN_RE.findall(data):
            key = _typed_key(token)
            if key is None:
                raise CaoError(f"unsupported key sequence {token!r}; send text, control "
                               "characters, arrows, Home/End, PgUp/PgDn or Delete")
            if key is _LITERAL and token.endswith(";"):  # tmux reads a last ';' as "next command"
                token = token[:-1] + "\\;"
            commands.append(["-l", token] if key is _LITERAL else [key])
        pane_id = terminal_row(self.store, terminal_id)["pane_id"]
        args = []
        for part in commands:
            args += [";"] * bool(args) + ["send-keys", "-t", pane_id, *part]
        tmux(*args)

    def exit(self, terminal_id):
        row = terminal_row(self.store, terminal_id)
        how = get_provider(row["provider"]).get("exit", {"keys": ["C-c"]})
        if "keys" in how:
            tmux_keys(row["pane_id"], *how["keys"])
        else:
            tmux_paste(row["pane_id"], how["text"])
            tmux_keys(row["pane_id"], "Enter")


FLEET_WAIT = 300.0  # s a new terminal waits for room under the fleet's limits


class Capacity:
    """The fleet's limits in settings.json: `max_agents` (terminals at once) and
    `max_agents_memory_mb` (what the agents' processes hold together). A new terminal
    beyond them waits for room, or fails at once when its caller asked not to wait;
    either way the error names the limit."""

    def __init__(self, store):
        self.store = store
        self.lock = threading.Lock()
        self.reserved = 0  # admitted terminals whose rows are not written yet

    def usage(self):
        settings = load_settings()
        agents = self.store.one("SELECT COUNT(*) AS n FROM terminals WHERE lost IS NULL")["n"]
        usage = {"agents": agents + self.reserved, "max_agents": settings.get("max_agents"),
                 "max_agents_memory_mb": settings.get("max_agents_memory_mb")}
        if usage["max_agents_memory_mb"] is not None:
            usage["agents_memory_mb"] = round(agents_memory_bytes() / 2**20, 1)
        return usage

    def _problem(self):
        usage = self.usage()
        for key, used in (("max_agents", "agents"), ("max_agents_memory_mb", "agents_memory_mb")):
            limit = usage[key]
            if limit is None:
                continue
            if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0:
                raise ConfigError(f"settings.json: {key} must be a number above 0, not "
                                  f"{limit!r}; fix it or remove it")
            if usage[used] >= limit:
                what = "agents run" if used == "agents" else "MiB are held by the agents"
                return f"{usage[used]:g} {what} and {key} in settings.json is {limit:g}"
        return None

    def admit(self, wait=True):
        """Hold a place for one new terminal until its row is written; returns the
        release function (it may be called more than once)."""
        deadline = time.monotonic() + FLEET_WAIT
        while True:
            with self.lock:
                problem = self._problem()
                if problem is None:
                    self.reserved += 1
                    held = [True]

                    def release():
                        with self.lock:
                            if held.pop() if held else False:
                                self.reserved -= 1
                    return release
            if not wait or time.monotonic() >= deadline:
                raise AtCapacity(f"fleet limit reached: {problem}; delete a terminal, raise the "
                                 "limit or try again later" + ("" if not wait else
                                 f" (waited {FLEET_WAIT:g} s)"))
            self.store.wait_until(lambda: False, 1.0)  # room comes when a terminal goes


def agents_memory_bytes():
    """Resident memory of every process in cao's tmux panes, children included."""
    roots = [int(p) for p in tmux("list-panes", "-a", "-F", "#{pane_pid}", check=False).split()
             if p.isdigit()]
    return sum(rss for rss, _ in process_trees(roots).values())


def process_trees(roots):
    """{root pid: (resident bytes, CPU ticks)} of each process tree, from /proc."""
    children, own = {}, {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/statm") as f:
                rss = int(f.read().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue
        own[int(entry)] = (rss, int(fields[11]) + int(fields[12]))  # utime + stime
        children.setdefault(int(fields[1]), []).append(int(entry))
    totals = {}
    for root in roots:
        rss = ticks = 0
        todo = [root]
        while todo:
            pid = todo.pop()
            r, t = own.get(pid, (0, 0))
            rss, ticks = rss + r, ticks + t
            todo.extend(children.get(pid, ()))
        totals[root] = (rss, ticks)
    return totals


class Launcher:
    """Starts a terminal's CLI in its tmux window from the terminal's record: argv,
    environment and files from the provider entry. Used for a new terminal and for
    one brought back after its tmux died."""

    def __init__(self, home, host, port):
        self.home, self.host, self.port = home, host, port
        self.hooks = []  # (profile, provider entry, launch fields) -> None; may edit fields

    def window_env(self, terminal_id):
        env = {k: v for k, v in os.environ.items() if k.startswith("CAO_")}
        env.update({k: os.environ[k] for k in WINDOW_ENV_KEYS if k in os.environ})
        env.update(CAO_TERMINAL_ID=terminal_id, CAO_HOME_DIR=str(self.home),
                   CAO_API_HOST=self.host, CAO_API_PORT=str(self.port))
        return env

    def spawn(self, spec, profile, record, env, new_session, resume=None):
        """Start the CLI for `record` (a terminals row's fields); returns the pane id.
        With resume (a conversation id), the CLI continues that conversation."""
        tools = json.loads(record["allowed_tools"]) if record["allowed_tools"] else None
        fields = self.fields(spec, profile, record["id"], record["working_directory"], tools,
                             env, record["model"])
        fields["conversation_id"] = resume or record["conversation_id"] or ""
        fields["resume" if resume else "new_conversation"] = bool(fields["conversation_id"])
        for hook in self.hooks:
            hook(profile, spec, fields)
        argv, extra_env, files = launch_plan(spec, fields)
        for name in set(spec.get("json_env", [])) & set(extra_env):
            extra_env[name] = _json_over_users(name, {**os.environ, **env}.get(name),
                                               extra_env[name])
        env = {**env, **extra_env}
        context_dir = self.home / "terminals" / record["id"]
        for name, content in files.items():
            (context_dir / name).parent.mkdir(parents=True, exist_ok=True)
            write_inside(context_dir / name, self.home, content)
        if spec.get("home_overlay"):
            env.update(build_home_overlay(spec["home_overlay"], fields, context_dir,
                                          env.get("HOME") or Path.home(), self.home,
                                          {**os.environ, **env}))
        return tmux_spawn(record["session_name"], record["window_name"],
                          record["working_directory"], env, argv, new_session)

    def fields(self, spec, profile, terminal_id, workdir, tools, env, model):
        prompt = profile.get("system_prompt") or ""
        restricted = tool_enforcement(spec, tools) != "none"
        disallowed = []
        if restricted and spec.get("tools"):
            allowed = resolve_tools(tools)
            kept = {n for name in allowed for n in spec["tools"].get(name, ())}
            disallowed = sorted({n for name, natives in spec["tools"].items() if name not in allowed
                                 for n in natives} - kept)
        elif restricted:
            prompt += ("\n\nOnly use these tools: " + ", ".join(tools) +
                       ". Do not use any other tool.").lstrip("\n")
        mcp_argv = self_command() + ["mcp"]
        mcp_env = {k: env[k] for k in ("CAO_TERMINAL_ID", "CAO_HOME_DIR", "CAO_API_HOST",
                                       "CAO_API_PORT", "CAO_ENABLE_WORKING_DIRECTORY",
                                       "CAO_ENABLE_SENDER_ID_INJECTION") if k in env}
        servers = {name: server for name, server in (profile.get("mcpServers") or {}).items()
                   if isinstance(server, dict) and name != CAO_MCP_NAME}
        servers[CAO_MCP_NAME] = {"command": mcp_argv[0], "args": mcp_argv[1:], "env": mcp_env,
                                 **spec.get("mcp_server_keys", {})}
        hook = self_command() + ["hook"]
        return {"profile": profile["name"], "terminal_id": terminal_id, "system_prompt": prompt,
                "model": model or "", "working_directory": workdir,
                "context_dir": str(self.home / "terminals" / terminal_id),
                "cao": self_command(), "mcp_command": mcp_argv[0], "mcp_args": mcp_argv[1:],
                "mcp_argv": mcp_argv, "mcp_env": mcp_env, "mcp_servers": servers,
                "hook": hook, "hook_command": shlex.join(hook),
                "skills_dir": str(self.home / "terminals" / terminal_id / "skills"),
                "yolo": tools == ["*"], "restricted": bool(disallowed),
                "disallowed_tools": disallowed}


MCP_READY_WAIT = 15.0  # s a new CLI's first input waits for its `cao mcp` to connect


class Terminals:
    """Terminal lifecycle: each is a tmux window, a database row and a live record.
    Creating one launches its CLI from the provider entry; deleting one saves its
    scrollback first."""

    def __init__(self, store, bus, live, watcher, tracker, typist, launcher, capacity):
        self.store, self.bus, self.live, self.watcher = store, bus, live, watcher
        self.tracker, self.typist, self.launcher = tracker, typist, launcher
        self.capacity = capacity
        self.home = launcher.home

    def adopt(self, terminal_id, pane_id, started=None):
        """Follow a terminal's window (new, or one that outlived a server restart: its
        saved status may be stale, and the first screen read sets the real one).
        started: the provider entry of a CLI just started here; if it loads cao's MCP
        server, its first input waits (MCP_READY_WAIT s at most) until that connects."""
        term = self.live[terminal_id] = Terminal(terminal_id)
        if started and "{mcp_" in json.dumps(started):
            term.mcp_wait = time.monotonic() + MCP_READY_WAIT
        self.watcher.add(terminal_id, pane_id)

    # -- lookups -----------------------------------------------------------
    def row(self, terminal_id):
        return terminal_row(self.store, terminal_id)

    def to_json(self, row):
        tools = json.loads(row["allowed_tools"]) if row["allowed_tools"] else None
        return {"id": row["id"], "name": row["window_name"], "provider": row["provider"],
                "session_name": row["session_name"], "agent_profile": row["agent_profile"],
                "caller_id": row["caller_id"], "allowed_tools": tools,
                "tool_enforcement": tool_enforcement(providers().get(row["provider"], {}), tools)
                if tools else "none",
                "working_directory": row["working_directory"],
                "tmux_session": row["session_name"], "tmux_window": row["window_name"],
                "status": self.tracker.status(row["id"]) or row["status"],
                "description": row["description"], "model": row["model"],
                "initial_delivery": json.loads(row["initial_delivery"])
                if row["initial_delivery"] else None,
                "worktree": json.loads(row["worktree"])["path"] if row["worktree"] else None,
                "last_active": _iso(row["last_active"]),
                "conversation_id": row["conversation_id"], "resumed": row["resumed"],
                "lost": _lost_json(row["lost"])}

    def get(self, terminal_id):
        return self.to_json(self.row(terminal_id))

    def all(self):
        return [self.to_json(r) for r in
                self.store.query("SELECT * FROM terminals ORDER BY created_at, rowid")]

    def waiting(self):
        """Terminals whose agent waits on a question, each with the question's lines."""
        return [{**term, "question": _screen_tail(self.tracker.screen(term["id"]), 12)}
                for term in self.all() if term["status"] == "waiting_user_answer"]

    def in_session(self, name):
        return [self.to_json(r) for r in self.store.query(
            "SELECT * FROM terminals WHERE session_name = ? ORDER BY created_at, rowid", (name,))]

    def output(self, terminal_id, mode="full"):
        row = self.row(terminal_id)
        if mode == "full":
            return tmux_capture(row["pane_id"], history="all")
        if mode == "last":
            text = tmux_capture(row["pane_id"], history=2000)
            answer = extract_answer(get_provider(row["provider"]), text)
            if answer is None:
                raise NotFound(f"terminal {terminal_id} shows no answer yet "
                               f"(status {self.tracker.status(terminal_id)}); wait for completed")
            return answer
        raise CaoError(f"unknown output mode {mode!r}; use full or last")

    def siblings(self, terminal_id, depth=None, cross_session=False):
        """The other terminals a terminal may see: its session's (every session's with
        cross_session), within `depth` hops along who-assigned-whom if given. Only for
        a terminal whose tools include `discovery` (or that is unrestricted)."""
        row = self.row(terminal_id)
        tools = json.loads(row["allowed_tools"]) if row["allowed_tools"] else None
        if tools is not None and "*" not in tools and "discovery" not in tools:
            raise Forbidden(f"terminal {terminal_id} may not list its siblings: add `discovery` "
                            "to its profile's allowedTools")
        rows = self.store.query("SELECT * FROM terminals WHERE ? OR session_name = ? "
                                "ORDER BY created_at, rowid", (bool(cross_session), row["session_name"]))
        if depth is not None:
            links = {}
            for r in rows:
                if r["caller_id"]:
                    links.setdefault(r["id"], set()).add(r["caller_id"])
                    links.setdefault(r["caller_id"], set()).add(r["id"])
            near, frontier = {terminal_id}, {terminal_id}
            for _ in range(depth):
                frontier = {n for t in frontier for n in links.get(t, ())} - near
                near |= frontier
            rows = [r for r in rows if r["id"] in near]
        return [{"id": r["id"], "group": r["session_name"], "status": self.tracker.status(r["id"])
                 or r["status"], "metadata": {"agent_profile": r["agent_profile"],
                                              "provider": r["provider"], "caller_id": r["caller_id"],
                                              "description": r["description"]}}
                for r in rows if r["id"] != terminal_id]

    def screen(self, terminal_id, etag=None, wait=0.0):
        """The visible screen with its colours, for a terminal emulator in a browser. With
        the etag of the client's copy, wait up to `wait` s for a change before answering
        {"changed": false}: an idle terminal costs a watcher nothing."""
        self.row(terminal_id)
        changed = self.screens({terminal_id: etag}, wait)
        if changed:
            return changed[0]
        return {"terminal_id": terminal_id, "changed": False, "etag": etag}

    def screens(self, etags, wait=0.0):
        """The screens ({terminal id: the client's etag}) that differ from the client's
        copies, as soon as one does or when `wait` runs out: one long-poll serves every
        terminal a page shows. A terminal that is gone is answered {"gone": true}."""
        deadline, pending, changed, counts = time.monotonic() + wait, list(etags), [], {}
        while True:
            for tid in pending:  # count first: output after the capture is a change to come
                counts[tid] = self.watcher.output_count(tid)
                screen = self._screen(tid)
                if screen.get("etag") != etags[tid]:
                    changed.append(screen)
            left = deadline - time.monotonic()
            if changed or left <= 0:
                return changed
            # Output may come in bursts: look again once it has been quiet for 30 ms.
            pending = self.watcher.wait_any_settled(counts, 0.03, left)
            if not pending:
                return changed

    def _screen(self, terminal_id):
        import hashlib
        row = self.store.one("SELECT pane_id FROM terminals WHERE id = ?", (terminal_id,))
        try:
            screen, cursor, size = tmux_screen(row["pane_id"]) if row else (None, None, None)
        except TmuxError:
            screen = None
        if screen is None:
            return {"terminal_id": terminal_id, "changed": True, "gone": True}
        tag = hashlib.sha1(f"{screen}{cursor}{size}".encode()).hexdigest()[:16]
        return {"terminal_id": terminal_id, "changed": True, "etag": tag, "screen": screen,
                "cursor": list(cursor), "size": list(size)}

    def set_description(self, terminal_id, description):
        self.row(terminal_id)
        self.store.execute("UPDATE terminals SET description = ? WHERE id = ?",
                           (check_description(description), terminal_id))
        return self.get(terminal_id)

    def working_directory(self, terminal_id):
        row = self.row(terminal_id)
        return tmux_pane_info(row["pane_id"], "#{pane_current_path}") or row["working_directory"]

    # -- creation ----------------------------------------------------------
    def create(self, session_name, agent_profile, provider=None, working_directory=None,
               allowed_tools=None, caller_id=None, new_session=False, initial_message=None,
               model=None, description=None, use_worktree=False, env_vars=None,
               resume_conversation=None, wait_for_room=True, terminal_id=None):
        """env_vars (new sessions only) reach this terminal and every later one of the
        session. resume_conversation: the CLI continues that conversation of its own.
        Beyond the fleet's limits it waits for room, or fails at once without
        wait_for_room. terminal_id: an id picked beforehand (a handoff job records it
        first, so a server restart mid-start still finds its worker)."""
        release = self.capacity.admit(wait_for_room)
        try:
            return self._create(session_name, agent_profile, provider, working_directory,
                                allowed_tools, caller_id, new_session, initial_message, model,
                                description, use_worktree, env_vars, resume_conversation, release,
                                terminal_id)
        finally:
            release()

    def _create(self, session_name, agent_profile, provider, working_directory, allowed_tools,
                caller_id, new_session, initial_message, model, description, use_worktree,
                env_vars, resume_conversation, release, terminal_id):
        profile = load_profile(agent_profile)
        model = check_model(model) if model is not None else profile.get("model")
        description = check_description(description)
        if provider is None:
            provider = profile.get("provider") or load_settings().get("default_provider") \
                or DEFAULT_PROVIDER
        spec = get_provider(provider)
        if not provider_installed(spec):
            raise CaoError(f"provider {provider} needs `{provider_binary(spec)}` on PATH; "
                           f"install it: {spec.get('install', 'see docs/providers')}")
        prepare_first_run(provider, spec)
        session_name = session_name_for(session_name)
        session = self.store.one("SELECT * FROM sessions WHERE name = ?", (session_name,))
        if not new_session and not session:
            raise NotFound(f"session {session_name} not found; create it with POST /sessions")
        workdir = resolve_working_directory(working_directory or (
            session["working_directory"] if session else None))
        parent = None
        if caller_id is not None:
            parent_tools = self.row(caller_id)["allowed_tools"]
            parent = json.loads(parent_tools) if parent_tools else ["*"]
        tools = profile_tools(profile, allowed_tools, parent)
        terminal_id = terminal_id or uuid.uuid4().hex[:8]
        worktree = None
        if use_worktree:
            worktree = worktree_add(workdir, self.home / "worktrees" / terminal_id,
                                    f"cao/{profile['name']}-{terminal_id}")
            workdir = worktree["path"]
        # The frontmatter name is free text; tmux expands formats in window names.
        window = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(profile["name"]))[:48] + f"-{terminal_id[:4]}"
        session_env = check_env_vars(env_vars) if new_session else \
            json.loads(session["env_vars"] or "{}")
        conversation = str(uuid.uuid4()) if "new_conversation" in spec.get("args", {}) else None
        if resume_conversation is not None:
            check_conversation_id(resume_conversation)
            if "resume" not in spec.get("args", {}):
                raise CaoError(f"provider {provider} cannot resume a conversation by id; drop "
                               "resume_session_id or pick a provider that can (docs/resume.md)")
            conversation = resume_conversation
        now = time.time()
        if new_session:
            self.store.execute("INSERT INTO sessions(name, working_directory, agent_profile,"
                               " created_at, env_vars) VALUES (?,?,?,?,?)",
                               (session_name, workdir, profile["name"], now,
                                json.dumps(session_env) if session_env else None))
        self.store.execute(
            "INSERT INTO terminals(id, session_name, window_name, provider, agent_profile,"
            " working_directory, allowed_tools, caller_id, status, created_at, last_active,"
            " model, description, worktree, initial_delivery, conversation_id)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (terminal_id, session_name, window, provider, profile["name"], workdir,
             json.dumps(tools) if tools else None, caller_id, "unknown", now, now,
             model, description, json.dumps(worktree) if worktree else None,
             json.dumps({"state": "pending"}) if initial_message else None, conversation))
        release()  # the row holds the place now
        try:
            env = {**session_env, **self.launcher.window_env(terminal_id)}
            pane_id = self.launcher.spawn(spec, profile, self.row(terminal_id), env, new_session,
                                          resume=resume_conversation)
        except CaoError:
            self.store.execute("DELETE FROM terminals WHERE id = ?", (terminal_id,))
            if new_session:
                self.store.execute("DELETE FROM sessions WHERE name = ?", (session_name,))
            if worktree:
                worktree_remove(worktree)
            shutil.rmtree(self.home / "terminals" / terminal_id, ignore_errors=True)
            raise
        self.store.execute("UPDATE terminals SET pane_id = ? WHERE id = ?", (pane_id, terminal_id))
        self.adopt(terminal_id, pane_id, spec)
        if new_session:
            self.store.emit("session_created", session_name)
        self.store.emit("terminal_created", session_name, terminal_id,
                        agent_profile=profile["name"], provider=provider)
        if initial_message:
            threading.Thread(target=self._deliver_initial, daemon=True,
                             args=(terminal_id, initial_message)).start()
        else:
            try:
                self.tracker.wait_ready(terminal_id, self.init_timeout(profile))
            except NeedsLogin:
                self.delete(terminal_id)  # a login screen left behind helps nobody
                raise
            except TmuxError as e:  # the caller hears it failed: no lost terminal to resume
                self.forget(terminal_id, "tmux died while it started")
                raise TmuxError(f"{e}; start it again") from None
        return self.get(terminal_id)

    def init_timeout(self, profile):
        value = (profile or {}).get("provider_init_timeout") or \
            load_settings().get("provider_init_timeout")
        return float(value or os.environ.get("CAO_PROVIDER_INIT_TIMEOUT") or 60)

    def _deliver_initial(self, terminal_id, message):
        """Send a new terminal its first message once it is ready; the outcome is kept
        as its `initial_delivery` ({"state": pending | delivered | failed})."""
        try:
            self.tracker.wait_ready(terminal_id, 120)
            self.typist.send(terminal_id, message)
            outcome = {"state": "delivered"}
            caller = self.store.one("SELECT caller_id, session_name FROM terminals WHERE id = ?",
                                    (terminal_id,))
            if caller and caller["caller_id"]:
                self.store.emit("message_sent", caller["session_name"], terminal_id,
                                sender=caller["caller_id"], message=message,
                                orchestration_type="assign")
        except CaoError as e:
            outcome = {"state": "failed", "kind": type(e).__name__, "message": str(e)}
            row = self.store.one("SELECT session_name FROM terminals WHERE id = ?", (terminal_id,))
            self.store.emit("input_failed", row and row["session_name"], terminal_id, reason=str(e))
        self.store.execute("UPDATE terminals SET initial_delivery = ? WHERE id = ?",
                           (json.dumps(outcome), terminal_id))

    # -- deletion ----------------------------------------------------------
    def _snapshot(self, row):
        logs = self.home / "logs" / "terminal"
        try:
            scrollback = tmux_capture(row["pane_id"], history="all").rstrip() + "\n"
        except TmuxError:
            scrollback = None
        if scrollback is not None:
            write_inside(logs / f"{row['id']}.scrollback", self.home, scrollback)
        snapshot = {"terminal_id": row["id"], "session_name": row["session_name"],
                    "window_name": row["window_name"], "agent_profile": row["agent_profile"],
                    "provider": row["provider"], "working_directory": row["working_directory"],
                    "allowed_tools": json.loads(row["allowed_tools"]) if row["allowed_tools"] else None,
                    "caller_id": row["caller_id"], "deleted_at": _iso(time.time()),
                    "scrollback": scrollback is not None}
        write_inside(logs / f"{row['id']}.snapshot.json", self.home, json.dumps(snapshot, indent=2))

    def delete(self, terminal_id):
        row = self.row(terminal_id)
        if row["pane_id"]:  # a lost terminal has no window left
            self._snapshot(row)
            self.watcher.remove(terminal_id)
            self.live.pop(terminal_id, None)  # its window closing is no news now
            tmux("kill-pane", "-t", row["pane_id"], check=False)
        self.forget(terminal_id, "deleted")

    def forget(self, terminal_id, reason):
        """Drop every trace of a terminal; the last one of a session ends the session."""
        row = self.store.one("SELECT session_name, worktree, agent_profile FROM terminals"
                             " WHERE id = ?", (terminal_id,))
        if row and row["worktree"]:
            worktree_remove(json.loads(row["worktree"]))
        self.watcher.remove(terminal_id)
        self.live.pop(terminal_id, None)
        shutil.rmtree(self.home / "terminals" / terminal_id, ignore_errors=True)
        if not row:
            return
        self.store.execute("DELETE FROM terminals WHERE id = ?", (terminal_id,))
        self.bus.publish("terminal_removed", terminal_id=terminal_id, reason=reason)
        self.store.emit("terminal_deleted", row["session_name"], terminal_id, reason=reason,
                        agent_profile=row["agent_profile"])
        if not self.store.one("SELECT 1 AS x FROM terminals WHERE session_name = ?",
                              (row["session_name"],)):
            self.end_session(row["session_name"])

    def end_session(self, name):
        tmux("kill-session", "-t", f"={name}", check=False)
        if self.store.execute("DELETE FROM sessions WHERE name = ?", (name,)):
            self.store.emit("session_deleted", name)


class Sessions:
    """Sessions: a tmux session holding a conductor terminal and its workers."""

    def __init__(self, store, terminals):
        self.store, self.terminals = store, terminals
        self._tmux_cache = (0.0, {})

    def _attached(self):
        stamp, sessions = self._tmux_cache
        if time.monotonic() - stamp > 1.0:
            sessions = tmux_sessions()
            self._tmux_cache = (time.monotonic(), sessions)
        return sessions

    def _to_json(self, row):
        attached = self._attached().get(row["name"], 0)
        lost = self.store.one(
            "SELECT 1 AS x FROM terminals WHERE session_name = ? AND lost IS NOT NULL", (row["name"],))
        return {"id": row["name"], "name": row["name"],
                "status": "lost" if lost else "active" if attached else "detached",
                "working_directory": row["working_directory"],
                "agent_profile": row["agent_profile"]}

    def list(self):
        return [self._to_json(r) for r in
                self.store.query("SELECT * FROM sessions ORDER BY created_at")]

    def get(self, name):
        row = self.store.one("SELECT * FROM sessions WHERE name = ?", (session_name_for(name),))
        if not row:
            raise NotFound(f"session {name} not found; list sessions with `cao session list`")
        return {"session": self._to_json(row), "terminals": self.terminals.in_session(row["name"])}

    def create(self, agent_profile, provider=None, session_name=None, working_directory=None,
               allowed_tools=None, initial_message=None, model=None, use_worktree=False,
               env_vars=None, resume_conversation=None, wait_for_room=True):
        name = session_name_for(uuid.uuid4().hex[:8] if session_name is None else session_name)
        if self.store.one("SELECT 1 AS x FROM sessions WHERE name = ?", (name,)) or \
                name in tmux_sessions():
            raise Conflict(f"session {name} already exists; pick another --session-name "
                           f"or run `cao shutdown --session {name}`")
        return self.terminals.create(name, agent_profile, provider, working_directory,
                                     allowed_tools, new_session=True,
                                     initial_message=initial_message, model=model,
                                     use_worktree=use_worktree, env_vars=check_env_vars(env_vars),
                                     resume_conversation=resume_conversation,
                                     wait_for_room=wait_for_room)

    def delete(self, name):
        name = self.get(name)["session"]["name"]
        for term in self.terminals.in_session(name):
            self.terminals.delete(term["id"])
        self.terminals.end_session(name)
        return {"success": True, "deleted": [name], "errors": []}


###############################################################################
# Inbox and orchestration #####################################################
###############################################################################

INBOX_STATES = ("queued", "delivering", "delivered", "failed")


class Inbox:
    """Durable messages between terminals: queued -> delivering -> delivered, or
    failed with a reason. A receiver gets its queue when its status turns idle or
    completed (never while busy); consecutive messages from one sender go in one
    paste. Each row is marked delivering before the
    paste, and the paste keeps a tmux buffer named after the batch until the row is
    delivered, so after a crash the buffer tells whether the paste happened."""

    def __init__(self, store, bus, tracker, terminals, typist):
        self.store, self.tracker, self.terminals, self.typist = store, tracker, terminals, typist
        self.running = set()
        self.guard = threading.Lock()
        # No delivery may start before recovery has settled what a crash left behind.
        self.recovered = threading.Event()
        bus.subscribe("status", self._on_status)
        bus.subscribe("terminal_removed", self._on_removed)

    def recover(self):
        """Settle rows a crash left in `delivering`: the paste happened exactly when its
        tmux buffer exists (then make sure it was submitted), else queue it again."""
        batches = {}
        for row in self.store.query("SELECT * FROM inbox WHERE status = 'delivering' ORDER BY id"):
            batches.setdefault(row["batch_id"], []).append(row)
        for batch_id, rows in batches.items():
            ids = [r["id"] for r in rows]
            buffer = f"cao-msg-{batch_id}"
            if tmux_buffer_exists(buffer):
                try:
                    self.typist.ensure_submitted(rows[0]["receiver_id"], rows[-1]["message"])
                    self._set_rows(ids, "delivered")
                except CaoError as e:
                    self._set_rows(ids, "failed", f"pasted before a restart, then: {e}")
                tmux("delete-buffer", "-b", buffer, check=False)
            else:
                self._set_rows(ids, "queued", "re-queued after a restart")
        self.recovered.set()
        for row in self.store.query("SELECT DISTINCT receiver_id FROM inbox WHERE status = 'queued'"):
            self.kick(row["receiver_id"])

    def post(self, sender_id, receiver_id, message):
        check_terminal_id(receiver_id)
        check_message(message)
        if not isinstance(sender_id, str) or not sender_id or len(sender_id) > 64:
            raise CaoError("sender_id is required (the sending terminal id or a name up to 64 chars)")
        if sender_id == receiver_id:
            raise CaoError("a terminal cannot send a message to itself; pick another receiver_id")
        self.terminals.row(receiver_id)
        if self.tracker.status(receiver_id) == "error":
            raise Conflict(f"terminal {receiver_id}'s agent has exited; it cannot take messages")
        now = time.time()
        message_id = self.store.insert(
            "INSERT INTO inbox(sender_id, receiver_id, message, status, created_at)"
            " VALUES (?,?,?,?,?)", (sender_id, receiver_id, message, "queued", now))
        self.store.emit("message_queued", None, receiver_id, message_id=message_id, sender_id=sender_id)
        self.kick(receiver_id)
        return {"success": True, "message_id": message_id, "sender_id": sender_id,
                "receiver_id": receiver_id, "created_at": _iso(now)}

    def messages(self, receiver_id, limit=10, status=None):
        self.terminals.row(receiver_id)
        if status is not None and status not in INBOX_STATES:
            raise CaoError(f"unknown message status {status!r}; use one of {', '.join(INBOX_STATES)}")
        rows = self.store.query(
            "SELECT * FROM inbox WHERE receiver_id = ? AND (? IS NULL OR status = ?)"
            " ORDER BY id DESC LIMIT ?", (receiver_id, status, status, int(limit)))
        return [{"id": r["id"], "sender_id": r["sender_id"], "receiver_id": r["receiver_id"],
                 "message": r["message"], "status": r["status"], "reason": r["reason"],
                 "created_at": _iso(r["created_at"]), "delivered_at": _iso(r["delivered_at"])}
                for r in rows]

    def kick(self, receiver_id):
        """Try to deliver receiver's queue in the background (one worker per receiver)."""
        with self.guard:
            if receiver_id in self.running:
                return
            self.running.add(receiver_id)
        threading.Thread(target=self._run, args=(receiver_id,), daemon=True).start()

    def _on_removed(self, terminal_id, reason):
        self.store.execute("UPDATE inbox SET status = 'failed', reason = ? WHERE receiver_id = ?"
                           " AND status IN ('queued', 'delivering')",
                           (f"receiver {terminal_id} was removed ({reason})", terminal_id))

    def _on_status(self, terminal_id, status):
        if status in ("idle", "completed"):
            self.kick(terminal_id)
        elif status == "error":
            self.store.execute("UPDATE inbox SET status = 'failed', reason = ? WHERE receiver_id = ?"
                               " AND status = 'queued'",
                               (f"receiver {terminal_id}'s agent has exited", terminal_id))

    def _run(self, receiver_id):
        self.recovered.wait()
        try:
            self._deliver(receiver_id)
        finally:
            with self.guard:
                self.running.discard(receiver_id)
        # A status change that arrived while we ran found us busy: look once more.
        if self._ready(receiver_id) and self.store.one(
                "SELECT 1 AS x FROM inbox WHERE receiver_id = ? AND status = 'queued'", (receiver_id,)):
            self.kick(receiver_id)

    def _set_rows(self, ids, status, reason=None):
        marks = ",".join("?" * len(ids))
        delivered = time.time() if status == "delivered" else None
        self.store.execute(f"UPDATE inbox SET status = ?, reason = ?, delivered_at = ? "
                           f"WHERE id IN ({marks})", (status, reason, delivered, *ids))

    def _ready(self, receiver_id):
        status = self.tracker.status(receiver_id)
        if status in ("idle", "completed"):
            return True
        if status == "processing" and _flag("CAO_EAGER_INBOX_DELIVERY", "false"):
            row = self.store.one("SELECT provider FROM terminals WHERE id = ?", (receiver_id,))
            return bool(row and providers().get(row["provider"], {}).get("eager_input"))
        return False

    def _deliver(self, receiver_id):
        while self._ready(receiver_id):
            queued = self.store.query("SELECT * FROM inbox WHERE receiver_id = ? AND status = 'queued'"
                                      " ORDER BY id LIMIT 100", (receiver_id,))
            if not queued:
                return
            batch = [queued[0]]
            for row in queued[1:]:
                if row["sender_id"] != batch[0]["sender_id"]:
                    break
                batch.append(row)
            ids = [r["id"] for r in batch]
            marks = ",".join("?" * len(ids))
            self.store.execute(f"UPDATE inbox SET status = 'delivering', batch_id = ? "
                               f"WHERE id IN ({marks})", (ids[0], *ids))
            buffer = f"cao-msg-{ids[0]}"
            try:
                self.typist.send(receiver_id, "\n".join(r["message"] for r in batch), buffer,
                                 only_if=lambda: self._ready(receiver_id))
            except Busy:  # other input went first; the next idle delivers these
                self._set_rows(ids, "queued")
                return
            except CaoError as e:
                if tmux_died_under(self.store, receiver_id):
                    # The receiver comes back with `cao session resume`. A message pasted
                    # before tmux died is in its conversation; the others wait for it.
                    if getattr(e, "pasted", False):
                        self._set_rows(ids, "delivered", "tmux died just after the paste")
                    else:
                        self._set_rows(ids, "queued", f"re-queued: tmux died before it was "
                                                      f"pasted ({e})")
                    return
                if isinstance(e, NotFound):
                    self._set_rows(ids, "failed", f"receiver {receiver_id} no longer exists")
                    return
                self._set_rows(ids, "failed", str(e))
                self.store.emit("message_failed", None, receiver_id, message_ids=ids, reason=str(e))
                return
            self._set_rows(ids, "delivered")
            tmux("delete-buffer", "-b", buffer, check=False)
            self.store.emit("message_delivered", None, receiver_id, message_ids=ids)
            for r in batch:
                self.store.emit("message_sent", None, receiver_id, sender=r["sender_id"],
                                message=r["message"], orchestration_type="send_message")



ANSWER_IN_FLIGHT = 30.0  # s after a handoff answered in which its caller may not have read it


class Handoffs:
    """Handoffs the server runs (POST /terminals/run-step): start the worker, give it
    the prompt, wait for its answer, remove it. Each carries the caller's job id, and
    its result is kept under it, so an answer that comes after the caller stopped
    waiting is not lost: get_handoff_result fetches it later."""

    def __init__(self, store, bus, terminals, typist, tracker, inbox):
        self.store, self.terminals, self.typist, self.tracker = store, terminals, typist, tracker
        self.inbox = inbox
        bus.subscribe("terminal_lost", self._on_lost)

    def recover(self):
        """Jobs a restart interrupted: follow the ones whose worker is still there."""
        for job in self.store.query("SELECT * FROM handoff_jobs WHERE state = 'running'"):
            worker = job["terminal_id"] and self.store.one(
                "SELECT lost FROM terminals WHERE id = ?", (job["terminal_id"],))
            if worker and worker["lost"]:
                self._lost(job, json.loads(worker["lost"])["reason"])
            elif job["terminal_id"] and self.tracker.status(job["terminal_id"]):
                if job["submitted"]:
                    self._follow(job["job_id"], job["terminal_id"], bool(job["teardown"]))
                else:  # the server died while it started the worker or gave the prompt
                    threading.Thread(target=self._resubmit, args=(job,), daemon=True,
                                     name=f"handoff-{job['job_id'][:8]}").start()
            elif job["terminal_id"] and not worker and not job["submitted"]:
                self._finish(job["job_id"], "error", error=f"cao-server stopped while it started "
                             f"worker {job['terminal_id']}; hand the task off again")
            else:
                self._finish(job["job_id"], "error", error="the worker was gone after a server restart")

    def _resubmit(self, job):
        """Finish what a restart cut: wait until the worker is ready, give it the
        prompt once, then follow it."""
        try:
            self.tracker.wait_ready(job["terminal_id"], self.terminals.init_timeout(None))
            self._submit(job["job_id"], job["terminal_id"], job["prompt"],
                         tmux_buffer_exists(f"cao-job-{job['job_id']}"))
        except CaoError as e:
            self._finish(job["job_id"], "error", error=f"the prompt could not be given after a "
                         f"server restart: {e}")
            return
        self._follow(job["job_id"], job["terminal_id"], bool(job["teardown"]))

    def _assign(self, job_id, terminal_id):
        self.store.execute("UPDATE handoff_jobs SET terminal_id = ? WHERE job_id = ?",
                           (terminal_id, job_id))
        return terminal_id

    def _submit(self, job_id, terminal_id, prompt, pasted=None):
        """Give the worker its prompt exactly once, across a server crash: the paste
        keeps a tmux buffer until the job says submitted, so recovery can tell a paste
        that happened (then only press Enter) from one that did not (paste it)."""
        buffer = f"cao-job-{job_id}"
        if pasted:
            self.typist.ensure_submitted(terminal_id, prompt)
        else:
            self.typist.send(terminal_id, prompt, buffer)
        self.store.execute("UPDATE handoff_jobs SET submitted = 1 WHERE job_id = ?", (job_id,))
        tmux("delete-buffer", "-b", buffer, check=False)

    def _tell(self, caller_id, agent, job_id, error):
        try:
            self.inbox.post("cao", caller_id, f"[cao] Your handoff to {agent} (job {job_id}) "
                                              f"failed: {error}")
        except CaoError:
            pass  # the caller is gone as well; the job keeps the error

    def _on_lost(self, terminal_id, reason):
        for job in self.store.query("SELECT * FROM handoff_jobs WHERE state = 'running'"
                                    " AND terminal_id = ?", (terminal_id,)):
            self._lost(job, reason)
        # A caller lost just after its handoff answered may never have shown the answer;
        # one that took new input since had it.
        now = time.time()
        caller = self.tracker.live.get(terminal_id)
        since = max(now - ANSWER_IN_FLIGHT, caller and caller.submitted_wall() or 0)
        for job in self.store.query("SELECT * FROM handoff_jobs WHERE caller_id = ? AND"
                                    " state = 'completed' AND finished_at >= ?",
                                    (terminal_id, since)):
            try:
                self.inbox.post("cao", terminal_id, f"[cao] Your handoff to "
                                f"{job['agent_profile']} (job {job['job_id']}) answered "
                                f"{now - job['finished_at']:.0f} s before you were lost with "
                                f"tmux; in case its answer never reached you, it was:\n"
                                f"{job['last_message']}")
            except CaoError:
                pass  # too long for an inbox message: get_handoff_result still has it

    def _lost(self, job, reason):
        """The worker of a running handoff died with tmux: the job fails, and its caller,
        whose own tool call most likely died too, hears it in its inbox."""
        error = (f"worker {job['terminal_id']} was lost before it answered ({reason}); "
                 f"`cao session resume` brings it back with its conversation, so ask it "
                 "again with send_message, or hand the task off anew")
        if self._finish(job["job_id"], "error", error=error) and job["caller_id"]:
            self._tell(job["caller_id"], job["agent_profile"], job["job_id"], error)

    def result(self, job_id):
        job = self.store.one("SELECT * FROM handoff_jobs WHERE job_id = ?", (_job_id(job_id),))
        if not job:
            raise NotFound(f"no handoff job {job_id}; it was never started here")
        return {"job_id": job["job_id"], "state": job["state"], "terminal_id": job["terminal_id"],
                "agent_profile": job["agent_profile"], "caller_id": job["caller_id"],
                "last_message": job["last_message"], "error_message": job["error_message"],
                "created_at": _iso(job["created_at"]), "finished_at": _iso(job["finished_at"])}

    def run_step(self, agent, prompt, provider=None, session_name=None, reuse_terminal_id=None,
                 teardown=True, timeout=600.0, working_directory=None, caller_id=None,
                 allowed_tools=None, model=None, description=None, use_worktree=False, job_id=None):
        import sqlite3
        check_message(prompt)
        job_id = _job_id(job_id) if job_id is not None else uuid.uuid4().hex
        try:
            self.store.insert("INSERT INTO handoff_jobs(job_id, caller_id, agent_profile, state,"
                              " created_at, prompt, submitted, teardown) VALUES (?,?,?,?,?,?,0,?)",
                              (job_id, caller_id, agent, "running", time.time(), prompt,
                               int(bool(teardown) and not reuse_terminal_id)))
        except sqlite3.IntegrityError:
            raise Conflict(f"handoff job {job_id} already exists; use a new job_id")
        try:
            if reuse_terminal_id:
                worker, teardown = self.terminals.get(reuse_terminal_id), False
                self._assign(job_id, worker["id"])
            else:
                wid = self._assign(job_id, uuid.uuid4().hex[:8])
                worker = self.terminals.create(session_name or f"step-{job_id[:8]}", agent,
                                               provider, working_directory, allowed_tools,
                                               caller_id, new_session=not session_name,
                                               model=model, description=description,
                                               use_worktree=use_worktree, terminal_id=wid)
            wid = worker["id"]
            self._submit(job_id, wid, prompt)
            if caller_id:
                self.store.emit("message_sent", worker["session_name"], wid, sender=caller_id,
                                message=prompt, orchestration_type="handoff")
        except CaoError as e:
            if self._finish(job_id, "error", error=str(e)) and caller_id and \
                    tmux_died_under(self.store, caller_id):
                self._tell(caller_id, agent, job_id, str(e))  # its own tool call died too
            raise
        status, answer = self._wait_answer(wid, ("waiting_user_answer",), timeout)
        if status in ("completed", "idle"):
            return self._answer(job_id, wid, teardown, answer)
        # Kept for inspection, after a restart too; its answer still counts.
        self.store.execute("UPDATE handoff_jobs SET teardown = 0 WHERE job_id = ?", (job_id,))
        self._follow(job_id, wid, teardown=False)
        if status == "error" or status is None:
            why = status and login_problem(worker["provider"], self.tracker.screen(wid))
            job = self.store.one("SELECT error_message FROM handoff_jobs WHERE job_id = ?",
                                 (job_id,))
            raise StepFailed(502, "error", job["error_message"] or f"worker {wid} " +
                             (why or "exited before answering"), terminal_id=wid, job_id=job_id)
        if status == "waiting_user_answer":
            raise StepFailed(502, "error", f"worker {wid} is waiting for an answer to its own "
                             "question (answer it with answer_user_prompt); it is kept",
                             terminal_id=wid, job_id=job_id)
        raise StepFailed(504, "timeout", f"worker {wid} did not finish within {timeout:g} s; it "
                         "keeps working and its answer is kept for get_handoff_result",
                         terminal_id=wid, job_id=job_id)

    def _wait(self, terminal_id, wanted, timeout):
        self.store.wait_until(lambda: self.tracker.status(terminal_id) in wanted + (None,), timeout)
        return self.tracker.status(terminal_id)

    def _wait_answer(self, terminal_id, also, timeout):
        """Wait until the worker is done with an answer on screen: (status, answer), the
        answer None if it stopped elsewhere (error, gone, one of `also`, time out). Idle or
        completed with no answer is not done yet: a CLI on a loaded machine can take the
        message seconds before it draws the turn (the tracker's grace is over by then).
        It counts as answerless after ANSWERLESS_WAIT s of that with the pane unchanged."""
        deadline = time.monotonic() + timeout
        answerless_since, printed = None, None
        while True:
            status = self._wait(terminal_id, ("completed", "idle", "error") + also,
                                max(0.0, deadline - time.monotonic()))
            if status not in ("completed", "idle"):
                return status, None
            try:
                return status, self.terminals.output(terminal_id, "last")
            except CaoError:
                pass
            count = self.tracker.watcher.output_count(terminal_id)
            if printed != count:
                answerless_since, printed = time.monotonic(), count
            now = time.monotonic()
            if now - answerless_since >= ANSWERLESS_WAIT or now >= deadline:
                return status, None
            self.store.wait_until(lambda: self.tracker.status(terminal_id) != status,
                                  min(1.0, deadline - now))

    def _answer(self, job_id, terminal_id, teardown, answer=None):
        try:
            if answer is None:
                answer = self.terminals.output(terminal_id, "last")
        except CaoError as e:
            self._finish(job_id, "error", error=str(e))
            raise StepFailed(502, "error", f"worker {terminal_id} finished but its answer could "
                             f"not be read: {e}", terminal_id=terminal_id, job_id=job_id)
        self._finish(job_id, "completed", answer)
        if teardown:
            try:
                self.typist.exit(terminal_id)
                self.terminals.delete(terminal_id)
            except CaoError:
                pass  # the answer is what the caller needs; a worker that went by itself is fine
        return {"terminal_id": terminal_id, "last_message": answer, "status": "completed",
                "replayed": False, "job_id": job_id}

    def _follow(self, job_id, terminal_id, teardown):
        """Wait in the background for a worker the caller stopped waiting for."""
        def follow():
            status, answer = self._wait_answer(terminal_id, (), 7 * 24 * 3600)
            if status in ("completed", "idle"):
                try:
                    self._answer(job_id, terminal_id, teardown, answer)
                except StepFailed:
                    pass
            else:
                self._finish(job_id, "error", error=f"worker {terminal_id} "
                             + ("was removed" if status is None else "exited") + " before answering")
        threading.Thread(target=follow, daemon=True, name=f"handoff-{job_id[:8]}").start()

    def _finish(self, job_id, state, answer=None, error=None):
        """End a running job; False if it had ended already."""
        return bool(self.store.execute(
            "UPDATE handoff_jobs SET state = ?, last_message = ?, error_message = ?,"
            " finished_at = ? WHERE job_id = ? AND state = 'running'",
            (state, answer, error, time.time(), job_id)))


def _job_id(job_id):
    if not isinstance(job_id, str) or not re.fullmatch(r"[0-9a-f]{32}", job_id):
        raise CaoError(f"job_id {job_id!r} is not a job id; use 32 lowercase hex digits "
                       "(uuid4().hex)")
    return job_id



# -- orchestration: the agents' tools ------------------------------------------
# handoff, assign, send_message and delete_terminal run in `cao mcp`, inside an
# agent's CLI, and act through the Client. Each is registered once here; the MCP
# section serves the table. Its docstring is what the model reads. A parameter
# named in `flagged` is offered only while its environment flag is on.

AGENT_TOOLS = []  # [(function, one-line summary, {parameter: flag})]
OPS_TOOLS = []    # the same, for `cao ops-mcp` (an agent outside any cao session)


def agent_tool(summary, flagged=None, table=AGENT_TOOLS):
    def register(func):
        table.append((func, summary, flagged or {}))
        return func
    return register


def own_terminal_id():
    """The terminal this `cao mcp` serves (cao sets CAO_TERMINAL_ID in every agent window)."""
    terminal_id = os.environ.get("CAO_TERMINAL_ID")
    if not terminal_id:
        raise CaoError("CAO_TERMINAL_ID is not set: cao mcp must run inside a cao terminal")
    return check_terminal_id(terminal_id)


def _caller(client):
    return client.terminal(own_terminal_id())


def _worker_body(client, caller, agent_profile, working_directory):
    """Where and as what a worker of the caller starts."""
    _check_profile_name(agent_profile)
    profile = client.profile(agent_profile)
    return {"caller_id": caller["id"], "provider": profile.get("provider") or caller["provider"],
            "working_directory": working_directory or client.working_directory(caller["id"])}


def _options(**values):
    return {k: v for k, v in values.items() if v not in (None, False)}


_WORKDIR_FLAG = {"working_directory": "CAO_ENABLE_WORKING_DIRECTORY"}


HANDOFF_SERVER_PATIENCE = 120.0  # s a handoff waits for its cao-server to come back
SERVER_RESTART_WAIT = 30.0  # s any tool call waits for a cao-server that refuses it


def _rejoin_handoff(client, job_id, deadline):
    """cao-server died under a handoff. It keeps the job and follows the worker when it
    restarts, so wait for it and then for the job's end (until the handoff's own
    deadline): the job, or None if the server never came back or never had the job."""
    job, answered = None, time.monotonic()
    while True:
        try:
            job, answered = client.handoff_result(job_id), time.monotonic()
        except ServerUnavailable:
            if time.monotonic() - answered > HANDOFF_SERVER_PATIENCE:
                return job
        except NotFound:  # it died before it recorded the job
            return None
        if job and (job["state"] != "running" or time.monotonic() > deadline):
            return job
        time.sleep(0.5)


@agent_tool("wait for a worker's answer", _WORKDIR_FLAG)
def handoff(agent_profile: str, message: str, timeout: int = 600,
            working_directory: str | None = None, model: str | None = None,
            description: str | None = None, use_worktree: bool = False) -> dict:
    """Hand a task to a new worker agent, wait until it finishes and return its
    answer; the worker is removed afterwards. timeout is 1-3600 seconds; a worker
    still busy then keeps going, and get_handoff_result(job_id) returns its answer
    later. model picks the worker's model; use_worktree runs it in its own git
    worktree on a new branch from your HEAD."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not 1 <= timeout <= 3600:
        raise CaoError(f"timeout={timeout!r} is out of range; use 1 to 3600 seconds")
    client = Client()
    caller = _caller(client)
    started = time.monotonic()
    job_id = uuid.uuid4().hex
    body = {**_worker_body(client, caller, agent_profile, working_directory),
            "agent": agent_profile, "prompt": message, "timeout": timeout, "job_id": job_id,
            "session_name": caller["session_name"],
            **_options(model=model, description=description, use_worktree=use_worktree)}
    try:
        step = client.run_step(body, timeout + 60)
    except StepFailed as e:
        wid = e.detail.get("terminal_id")
        if e.detail.get("kind") == "timeout":
            return {"success": False, "pending": True, "job_id": job_id, "output": None,
                    "terminal_id": wid,
                    "message": f"Handoff timed out after {timeout:g} seconds; worker {wid} is kept "
                               f"and keeps working: get_handoff_result(job_id={job_id!r}) returns "
                               "its answer when it has one (delete_terminal when done)"}
        return {"success": False, "output": None, "terminal_id": wid, "job_id": job_id,
                "message": f"Handoff failed: {e}"}
    except ServerUnavailable as e:
        step = _rejoin_handoff(client, job_id, started + timeout)
        if step is None or step["state"] == "running":
            return {"success": False, "pending": True, "job_id": job_id, "output": None,
                    "terminal_id": step and step["terminal_id"],
                    "message": f"Handoff interrupted ({e}); get_handoff_result("
                               f"job_id={job_id!r}) tells how it ended"}
        if step["state"] != "completed":
            return {"success": False, "output": None, "terminal_id": step["terminal_id"],
                    "job_id": job_id, "message": f"Handoff failed: {step['error_message']}"}
    return {"success": True, "output": step["last_message"], "terminal_id": step["terminal_id"],
            "job_id": job_id, "message": f"Successfully handed off to {agent_profile} "
                                         f"({body['provider']}) in {time.monotonic() - started:.1f}s"}


@agent_tool("start a worker; it reports back with send_message", _WORKDIR_FLAG)
def assign(agent_profile: str, message: str, working_directory: str | None = None,
           model: str | None = None, description: str | None = None,
           use_worktree: bool = False) -> dict:
    """Start a worker agent on a task and return its terminal id at once; the
    worker sends its results back to you with send_message. model picks the
    worker's model; use_worktree runs it in its own git worktree on a new branch."""
    client = Client()
    caller = _caller(client)
    if _flag("CAO_ENABLE_SENDER_ID_INJECTION", "true"):
        message += (f"\n\n[Assigned by terminal {caller['id']}. When done, send results back "
                    f"to terminal {caller['id']} using send_message]")
    worker = client.create_terminal(
        caller["session_name"], agent_profile=agent_profile, initial_message=message,
        **_worker_body(client, caller, agent_profile, working_directory),
        **_options(model=model, description=description, use_worktree=use_worktree))
    return {"success": True, "terminal_id": worker["id"],
            "message": f"Task assigned to {agent_profile} (terminal: {worker['id']}). It will "
                       "report back with send_message; call delete_terminal when done with it."}


@agent_tool("the answer of a handoff that timed out")
def get_handoff_result(job_id: str) -> dict:
    """The state of a handoff by its job_id (from a handoff that timed out):
    running, completed (with last_message) or error (with error_message)."""
    job = Client().handoff_result(job_id)
    return {"success": True, **{k: job[k] for k in ("state", "terminal_id", "last_message",
                                                     "error_message")}}


@agent_tool("answer a worker that waits on a question")
def answer_user_prompt(terminal_id: str, answer: str) -> dict:
    """Answer a worker whose status is waiting_user_answer (an approval or a
    question on its screen). answer is text to type, or a key: a digit to pick a
    numbered choice, y, n, Enter, Escape, Up, Down or Tab."""
    return Client().answer(terminal_id, answer)


@agent_tool("other agents near you (needs discovery)")
def list_siblings(depth: int | None = None, cross_session: bool = False) -> dict:
    """Other terminals of your session (every session with cross_session) with
    their status, profile and description; depth limits them to that many hops
    along who-assigned-whom. Needs `discovery` in your profile's allowedTools."""
    client = Client()
    caller = _caller(client)
    return {"success": True, "siblings": client.siblings(caller["id"], depth, cross_session)}


@agent_tool("to another terminal's inbox")
def send_message(message: str, receiver_id: str | None = None) -> dict:
    """Send a message to another terminal's inbox; it is delivered when that agent is
    idle. Without receiver_id it goes to the terminal that assigned you."""
    client = Client()
    caller = _caller(client)
    receiver_id = receiver_id or caller.get("caller_id")
    if not receiver_id:
        raise CaoError("no receiver_id given and no terminal assigned this one; pass receiver_id")
    if _flag("CAO_ENABLE_SENDER_ID_INJECTION", "true"):
        message += (f"\n\n[Message from terminal {caller['id']}. Use send_message MCP tool "
                    "for any follow-up work.]")
    return client.post_message(receiver_id, caller["id"], message)


@agent_tool("remove a worker you no longer need")
def delete_terminal(terminal_id: str) -> dict:
    """Remove a worker terminal you no longer need (its scrollback is saved)."""
    Client().delete_terminal(terminal_id)
    return {"success": True, "message": f"terminal {terminal_id} deleted"}

# -- the ops tools: cao driven by an agent outside it ----------------------------
# `cao ops-mcp` serves these to a primary agent (a Claude Code of your own, say)
# that starts and watches cao sessions; it needs no CAO_TERMINAL_ID.

OPS_SENDER = "cao-ops-mcp"


def ops_tool(summary):
    """Register an ops tool; its Python name has an ops_ prefix that its tool name drops."""
    def register(func):
        func.__name__ = func.__name__.removeprefix("ops_")
        return agent_tool(summary, table=OPS_TOOLS)(func)
    return register


@ops_tool("the agent profiles cao can launch")
def ops_list_profiles() -> dict:
    """Every agent profile cao can launch, with its description and provider."""
    return {"success": True, "profiles": Client().call("GET", "/agents/profiles")}


@ops_tool("one profile in full")
def ops_get_profile_details(name: str) -> dict:
    """One agent profile: its frontmatter fields and its system prompt."""
    return {"success": True, "profile": Client().profile(name)}


@ops_tool("install a profile by name or https URL")
def ops_install_profile(source: str, provider: str | None = None,
                    env_vars: dict[str, str] | None = None) -> dict:
    """Install an agent profile from a built-in name or an https URL; env_vars fill
    the ${VARS} it uses."""
    return Client().call("POST", "/agents/profiles/install", body=_options(
        source=source, provider=provider, env_vars=env_vars))


@ops_tool("start a session with an agent")
def ops_launch_session(agent_profile: str, provider: str | None = None,
                   session_name: str | None = None, working_directory: str | None = None,
                   allowed_tools: str | None = None, model: str | None = None,
                   initial_message: str | None = None,
                   env_vars: dict[str, str] | None = None) -> dict:
    """Start a new cao session whose first agent runs agent_profile; initial_message
    is delivered as soon as the agent is ready."""
    term = Client().create_session(**_options(
        agent_profile=agent_profile, provider=provider, session_name=session_name,
        working_directory=working_directory, allowed_tools=allowed_tools, model=model,
        initial_message=initial_message, env_vars=env_vars))
    return {"success": True, "session_name": term["session_name"], "terminal_id": term["id"],
            "message": f"Session {term['session_name']} started with {term['agent_profile']} "
                       f"({term['provider']}), terminal {term['id']}"}


@ops_tool("message an agent (delivered when it is idle)")
def ops_send_session_message(terminal_id: str, message: str) -> dict:
    """Put a message in an agent's inbox; it is typed in when the agent is idle."""
    return Client().post_message(terminal_id, OPS_SENDER, message)


@ops_tool("what an agent's screen shows, or its last answer")
def ops_read_session_output(terminal_id: str | None = None, session_name: str | None = None,
                        mode: str = "full", max_chars: int | None = None) -> dict:
    """An agent's output by terminal id, or the first agent of session_name. mode:
    full (the screen and scrollback) or last (its last answer); max_chars keeps the end."""
    client = Client()
    if not terminal_id:
        if not session_name:
            raise CaoError("pass terminal_id or session_name")
        terminals = client.session(session_name)["terminals"]
        if not terminals:
            raise NotFound(f"session {session_name} has no terminals")
        terminal_id = terminals[0]["id"]
    output = client.output(terminal_id, mode)
    total = len(output)
    if max_chars is not None and max_chars < total:
        output = output[total - max(0, int(max_chars)):]
    return {"success": True, "terminal_id": terminal_id, "mode": mode, "output": output,
            "truncated": len(output) < total, "total_chars": total}


@ops_tool("one agent's status")
def ops_get_terminal_status(terminal_id: str) -> dict:
    """A terminal's status (idle, processing, completed, waiting_user_answer, error) and details."""
    term = Client().terminal(terminal_id)
    return {"success": True, "terminal_id": term["id"], "status": term["status"], "terminal": term}


@ops_tool("one agent's output")
def ops_get_terminal_output(terminal_id: str, mode: str = "last") -> dict:
    """A terminal's last answer (mode last) or whole screen (mode full)."""
    return {"success": True, "terminal_id": terminal_id, "mode": mode,
            "output": Client().output(terminal_id, mode)}


@ops_tool("every cao session")
def ops_list_sessions() -> dict:
    """Every cao session with its status."""
    return {"success": True, "sessions": Client().sessions()}


@ops_tool("a session and its terminals")
def ops_get_session_info(session_name: str) -> dict:
    """A session and every terminal in it, with their status."""
    return {"success": True, **Client().session(session_name)}


@ops_tool("end a session and its agents")
def ops_shutdown_session(session_name: str) -> dict:
    """End a session: every agent in it exits and its windows close."""
    result = Client().delete_session(session_name)
    return {"success": True, "message": f"Session {session_name} shut down", **result}



###############################################################################
# Resume ######################################################################
###############################################################################

# When tmux dies (its server killed, the machine rebooted) the agents go with it, but
# their records stay: each terminal is marked lost, keeps its id, profile, role,
# restrictions, inbox and links to its caller, and comes back in a window of the same
# name with its CLI's conversation resumed (`resume` args in its provider entry).


RESUME_QUIET = 2.0        # s a resumed CLI's screen stays still before it counts as ready
RESUME_SETTLE_MAX = 20.0  # s that wait lasts at most


class Resumer:
    """Marks terminals whose tmux session died as lost, and brings lost sessions back."""

    def __init__(self, store, bus, live, watcher, tracker, terminals, launcher):
        self.store, self.bus, self.live, self.watcher = store, bus, live, watcher
        self.tracker, self.terminals, self.launcher = tracker, terminals, launcher
        self.lock = threading.Lock()  # one resume at a time: two would race for the windows
        self.starting = set()  # terminals being resumed: an error screen may yet be mended

    def gone(self, terminal_id, why):
        """A terminal's window vanished: lost if its whole tmux session went (tmux died;
        it can come back), removed if only the window was closed."""
        row = self.store.one("SELECT session_name FROM terminals WHERE id = ?", (terminal_id,))
        if row and row["session_name"] not in tmux_sessions():
            self.lose(terminal_id, "its tmux session ended (tmux server killed or machine "
                                   "restarted)")
        else:
            self.terminals.forget(terminal_id, why)

    def lose(self, terminal_id, why):
        with self.store.lock:
            row = self.store.one("SELECT session_name, lost, status FROM terminals WHERE id = ?",
                                 (terminal_id,))
            if not row or row["lost"]:
                return
            # Its turn is cut if it was busy, or took input and never showed a turn for it.
            term = self.live.get(terminal_id)
            unshown = term is not None and term.submitted_at is not None and not term.turn_seen
            now = time.time()
            lost = {"at": now, "reason": why, "cut": row["status"] in BUSY_STATUSES or unshown}
            self.store.execute("UPDATE terminals SET lost = ?, status = 'error', pane_id = NULL"
                               " WHERE id = ?", (json.dumps(lost), terminal_id))
            submitted = term and term.submitted_wall()
            if lost["cut"] and submitted:
                self.store.execute(  # the message(s) of that turn
                    "UPDATE inbox SET reason = ? WHERE receiver_id = ? AND status = 'delivered'"
                    " AND delivered_at >= ?", ("delivered, then its receiver was lost before it "
                                               "finished its turn; it may not have acted on it",
                                               terminal_id, submitted - 1.0))
        # Listeners first: a handoff waiting on this worker must end as lost before
        # its waiter sees the worker gone.
        self.store.emit("terminal_lost", row["session_name"], terminal_id, reason=why)
        self.bus.publish("terminal_lost", terminal_id=terminal_id, reason=why)
        self.watcher.remove(terminal_id)
        self.live.pop(terminal_id, None)
        self.store.wake()  # waiters on its status see it gone

    def recover(self):
        """At server start: take back the windows that outlived the server, mark the
        terminals whose tmux session is gone as lost, forget closed windows."""
        panes, sessions = tmux_list_panes(), tmux_sessions()
        by_window = {(p["session"], p["window"]): pane_id for pane_id, p in panes.items()}
        for row in self.store.query("SELECT * FROM terminals WHERE lost IS NULL"):
            pane = panes.get(row["pane_id"] or "")
            unrecorded = not row["pane_id"] and by_window.get((row["session_name"],
                                                               row["window_name"]))
            if unrecorded:  # the server died after it opened the window, before it saved it
                self.store.execute("UPDATE terminals SET pane_id = ? WHERE id = ?",
                                   (unrecorded, row["id"]))
                self.terminals.adopt(row["id"], unrecorded)
            elif pane and pane["session"] == row["session_name"]:
                self.terminals.adopt(row["id"], row["pane_id"])
            elif row["session_name"] in sessions:
                self.terminals.forget(row["id"], "its tmux window was closed")
            else:
                self.lose(row["id"], "its tmux session was gone when cao-server started")
        self.store.execute("DELETE FROM sessions WHERE name NOT IN "
                           "(SELECT DISTINCT session_name FROM terminals)")

    def learn(self, terminal_id, conversation_id):
        """The conversation a CLI reported from its hooks: resume continues that one
        (it changes when a person starts a new conversation in the CLI)."""
        self.store.execute("UPDATE terminals SET conversation_id = ? WHERE id = ?",
                           (check_conversation_id(conversation_id), terminal_id))

    def lost_sessions(self):
        return [r["session_name"] for r in self.store.query(
            "SELECT session_name FROM terminals WHERE lost IS NOT NULL"
            " GROUP BY session_name ORDER BY MIN(created_at)")]

    def resume_all(self):
        return {"sessions": self._resume(self.lost_sessions())}

    def resume(self, name):
        """Start every lost terminal of session `name` again, each continuing its CLI's
        conversation where its provider can, else fresh; then wait until they are ready."""
        name = session_name_for(name)
        if not self.store.one("SELECT 1 AS x FROM sessions WHERE name = ?", (name,)):
            raise NotFound(f"session {name} not found; list sessions with `cao session list`")
        return self._resume([name])[0]

    def _resume(self, names):
        """Open the windows of all the sessions first, then wait for them together:
        the CLIs load side by side. (Opening them several at a time gained nothing:
        the CLIs already loading use the CPU the next window needs.)"""
        results = {}
        with self.lock:
            running = set(tmux_sessions())  # asked once: a tmux call costs 10-20 ms
            for name in names:
                session = self.store.one("SELECT * FROM sessions WHERE name = ?", (name,))
                session_env = json.loads(session["env_vars"] or "{}") if session else {}
                results[name] = []
                for row in self.store.query("SELECT * FROM terminals WHERE session_name = ? AND"
                                            " lost IS NOT NULL ORDER BY created_at, rowid", (name,)):
                    results[name].append(self._reopen(row, session_env, name not in running))
                    if results[name][-1]["resumed"] != "failed":
                        running.add(name)
        started = [r["terminal_id"] for name in names for r in results[name]
                   if r["resumed"] != "failed"]
        try:
            self._wait_started(started, {r["terminal_id"]: r for name in names
                                         for r in results[name]})
        finally:
            self.starting.difference_update(started)
        return [{"session_name": name, "terminals": results[name]} for name in names]

    def _reopen(self, row, session_env, new_session):
        """Start one lost terminal again; its entry in the resume's answer."""
        cut = turn_cut(row["lost"])
        try:
            mode = self._start(row, session_env, new_session, cut=cut)
        except CaoError as e:
            self.starting.discard(row["id"])
            self.store.execute("UPDATE terminals SET lost = ? WHERE id = ?", (json.dumps(
                {"at": time.time(), "reason": f"resume failed: {e}"}), row["id"]))
            return {"terminal_id": row["id"], "resumed": "failed", "detail": str(e)}
        return {"terminal_id": row["id"], "resumed": mode, **({"interrupted": True} if cut else {})}

    def _wait_started(self, started, by_id):
        deadline = time.monotonic() + self.terminals.init_timeout(None)
        for terminal_id in started:
            try:
                self.tracker.wait_ready(terminal_id, max(0.0, deadline - time.monotonic()))
            except CaoError as e:
                by_id[terminal_id]["detail"] = str(e)
        self._settle(started, deadline)
        for terminal_id in started:
            if by_id[terminal_id]["resumed"] == "conversation" and \
                    self.tracker.status(terminal_id) == "error":
                by_id[terminal_id].update(self._start_over(terminal_id))
            by_id[terminal_id]["status"] = self.tracker.status(terminal_id) or "error"

    def _start_over(self, terminal_id):
        """Its CLI could not resume the conversation (the CLI never saved it, or it was
        deleted) and exited or shows an error: start a new conversation in its place,
        so the terminal is usable, and say why."""
        row = self.store.one("SELECT * FROM terminals WHERE id = ?", (terminal_id,))
        session = self.store.one("SELECT env_vars FROM sessions WHERE name = ?",
                                 (row["session_name"],))
        old_pane, lines = row["pane_id"], []
        try:
            lines = [ln.strip() for ln in tmux_capture(old_pane, "all").splitlines()
                     if ln.strip() and not ln.startswith("Pane is dead")]
        except TmuxError:
            pass
        why = (f"its conversation {row['conversation_id']} could not be resumed"
               + (f" ({' / '.join(lines[-2:])[:200]})" if lines else "") + "; started a new one")
        self.watcher.remove(terminal_id)
        self.live.pop(terminal_id, None)
        try:
            with self.lock:
                self._start({**row, "conversation_id": None},
                            json.loads(session["env_vars"] or "{}") if session else {},
                            row["session_name"] not in tmux_sessions(), detail=why)
        except CaoError as e:
            why = f"{why[:why.rindex(';')]}, and a new start failed: {e}"
            self.store.execute("UPDATE terminals SET lost = ? WHERE id = ?",
                               (json.dumps({"at": time.time(), "reason": why}), terminal_id))
            return {"resumed": "failed", "detail": why}
        finally:  # after the new window opened: the old one may be its session's last
            tmux("kill-pane", "-t", old_pane, check=False)
        try:
            self.tracker.wait_ready(terminal_id, self.terminals.init_timeout(None))
        except CaoError as e:
            return {"resumed": "fresh", "detail": f"{why}, which failed too: {e}"}
        return {"resumed": "fresh", "detail": why}

    def _settle(self, terminal_ids, deadline):
        """A resumed CLI draws its prompt, then loads and redraws the old conversation
        (Gemini CLI, Qwen Code), and what is typed meanwhile is lost: it is ready once
        its screen has been still for RESUME_QUIET s."""
        deadline = min(deadline, time.monotonic() + RESUME_SETTLE_MAX)
        while time.monotonic() < deadline:
            quiet = min([self.watcher.quiet_for(t) for t in terminal_ids if t in self.live],
                        default=RESUME_QUIET)
            if quiet >= RESUME_QUIET:
                return
            self.store.wait_until(lambda: False, RESUME_QUIET - quiet)

    def _start(self, row, session_env, new_session, detail=None, cut=False):
        spec = get_provider(row["provider"])
        profile = load_profile(row["agent_profile"])
        if not provider_installed(spec):
            raise CaoError(f"provider {row['provider']} needs `{provider_binary(spec)}` on PATH")
        prepare_first_run(row["provider"], spec)
        args = spec.get("args", {})
        conversation = row["conversation_id"] if "resume" in args else None
        if not conversation:  # it starts a new conversation, under a new id if cao picks it
            row = {**row, "conversation_id": str(uuid.uuid4()) if "new_conversation" in args
                   else None}
        env = {**session_env, **self.launcher.window_env(row["id"])}
        self.starting.add(row["id"])
        pane_id = self.launcher.spawn(spec, profile, row, env, new_session, resume=conversation)
        mode = "conversation" if conversation else "fresh"
        self.store.execute("UPDATE terminals SET pane_id = ?, lost = NULL, resumed = ?,"
                           " conversation_id = ?, status = 'unknown' WHERE id = ?",
                           (pane_id, mode, row["conversation_id"], row["id"]))
        self.terminals.adopt(row["id"], pane_id, spec)
        self.store.emit("terminal_resumed", row["session_name"], row["id"], resumed=mode,
                        conversation_id=row["conversation_id"],
                        **({"detail": detail} if detail else {}),
                        **({"interrupted": True} if cut else {}))
        return mode


HUNG_CHECK = 10.0    # s between looks for agents that stopped printing
HUNG_AFTER = 1800.0  # s of no output and no CPU after which a busy agent counts as hung


class Watchdog(threading.Thread):
    """Tells a worker's caller, once, that the worker stopped: its CLI exited, it sits
    at an error screen, it has printed nothing for `hung_after` s (settings.json)
    while its processes used no CPU, or it was lost with tmux before it finished a turn.
    It never stops or deletes an agent, so one that is slow but printing or computing
    is left alone."""

    def __init__(self, store, bus, live, watcher, tracker, inbox, excused=frozenset()):
        super().__init__(name="cao-watchdog", daemon=True)
        self.store, self.live, self.watcher, self.tracker, self.inbox = \
            store, live, watcher, tracker, inbox
        self.excused = excused  # terminals under repair (being resumed): not reported
        self.told = set()  # terminals whose caller heard of this stop
        self.ticks = {}    # terminal id -> CPU ticks of its processes at the last look
        self.stopping = threading.Event()
        bus.subscribe("status", self._on_status)
        bus.subscribe("terminal_lost", self._on_lost)

    def _on_lost(self, terminal_id, reason):
        """An assigned worker's caller waits for a callback that its cut turn will never
        send: tell it. A handoff's worker is reported by the handoff itself."""
        row = self.store.one("SELECT lost FROM terminals WHERE id = ?", (terminal_id,))
        if not row or not turn_cut(row["lost"]):
            return
        handoff = self.store.one("SELECT 1 AS x FROM handoff_jobs WHERE terminal_id = ? AND"
                                 " (state = 'running' OR finished_at >= ?)",
                                 (terminal_id, json.loads(row["lost"])["at"]))
        if not handoff:
            self._report(terminal_id, f"it was lost before it finished a turn: {reason}. "
                                      "`cao session resume` brings it back with its "
                                      "conversation, but that turn is gone: send it the "
                                      "task again with send_message", event=False)

    def _on_status(self, terminal_id, status):
        if status == "error" and terminal_id not in self.excused:
            self._report(terminal_id, self._why(terminal_id))
        else:
            self.told.discard(terminal_id)

    def _why(self, terminal_id):
        row = self.store.one("SELECT pane_id, provider FROM terminals WHERE id = ?", (terminal_id,))
        state = tmux_capture_state(row["pane_id"]) if row and row["pane_id"] else None
        if not state:
            return "its window is gone"
        tail = " | ".join(_screen_tail(state[0], 3).split("\n")) or "(empty)"
        if state[1]:
            return f"its CLI exited; its screen ends: {tail}"
        return login_problem(row["provider"], state[0]) or f"it shows an error: {tail}"

    def _report(self, terminal_id, reason, event=True):
        if terminal_id in self.told:
            return
        self.told.add(terminal_id)
        row = self.store.one("SELECT session_name, caller_id, agent_profile FROM terminals"
                             " WHERE id = ?", (terminal_id,))
        if not row:
            return
        if event:  # terminal_lost says it already
            self.store.emit("agent_stopped", row["session_name"], terminal_id, reason=reason)
        handoff = self.store.one("SELECT 1 AS x FROM handoff_jobs WHERE terminal_id = ? AND"
                                 " state = 'running'", (terminal_id,))
        if row["caller_id"] and not handoff:  # a handoff reports to its caller itself
            try:
                self.inbox.post("cao", row["caller_id"], f"[cao] Worker {terminal_id} "
                                f"({row['agent_profile']}) stopped: {reason}")
            except CaoError:
                pass  # the caller has gone as well

    def run(self):
        every = float(os.environ.get("CAO_HUNG_CHECK") or HUNG_CHECK)
        while not self.stopping.wait(every):
            try:
                self._look_for_hung()
            except CaoError:
                pass  # a bad setting or a busy tmux: look again next time

    def _look_for_hung(self):
        limit = load_settings().get("hung_after", HUNG_AFTER)
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0:
            raise ConfigError(f"settings.json: hung_after must be seconds above 0, not {limit!r}")
        quiet = {tid: self.watcher.quiet_for(tid) for tid, term in list(self.live.items())
                 if term.status == "processing"}
        quiet = {tid: q for tid, q in quiet.items() if q >= limit}
        for tid in set(self.ticks) - set(quiet):
            del self.ticks[tid]
        panes = {tid: self.store.one("SELECT pane_id FROM terminals WHERE id = ?", (tid,))
                 for tid in quiet}
        pids = {tid: tmux_pane_info(p["pane_id"], "#{pane_pid}") for tid, p in panes.items() if p}
        trees = process_trees([int(p) for p in pids.values() if p and p.isdigit()])
        for tid, pid in pids.items():
            ticks = trees.get(int(pid))[1] if pid and pid.isdigit() else None
            if ticks is not None and self.ticks.get(tid) == ticks:
                self._report(tid, f"it has printed nothing for {quiet[tid]:.0f} s and its "
                                  f"processes use no CPU (hung_after in settings.json is {limit:g} s)")
            self.ticks[tid] = ticks

    def stop(self):
        self.stopping.set()


###############################################################################
# Memory ######################################################################
###############################################################################

# What agents learn and keep across sessions: short notes in sqlite, ranked with
# FTS5 where sqlite has it (LIKE otherwise). A note belongs to a scope: global,
# the project (its git remote, else its path), the session or the agent profile.
# The first message each new terminal gets starts with the relevant notes.

MEMORY_SCOPES = ("global", "project", "session", "agent")
MEMORY_TYPES = ("user", "feedback", "project", "reference")
MEMORY_SEARCH_MODES = ("hybrid", "keyword", "substring")
MEMORY_SORTS = ("score", "recency", "usage")
MEMORY_BUDGET = 1000      # characters injected per scope
MEMORY_PER_SCOPE = 10
MAX_MEMORY = 16 * 1024    # characters in one memory
MEMORY_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_REMOTE_RE = re.compile(r"(?:[a-z+]+://)?(?:[^@/]+@)?([^/:]+)(?::\d+)?[:/](.+?)(?:\.git)?/*\Z")


def _git_remote(workdir):
    """The normalised origin URL of the repository holding workdir, or None."""
    try:
        done = subprocess.run(["git", "-C", workdir, "config", "--get", "remote.origin.url"],
                              capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    url = done.stdout.strip()
    match = _REMOTE_RE.match(url) if done.returncode == 0 else None
    return f"{match.group(1).lower()}/{match.group(2)}" if match else (url or None)


def _memory_settings():
    setting = load_settings().get("memory") or {}
    if not isinstance(setting, dict):
        raise ConfigError("settings.json: memory must be an object, such as {\"enabled\": true}")
    return setting


def memory_enabled():
    return _memory_settings().get("enabled", True) is not False


def _choice(value, choices, what):
    if value not in choices:
        raise CaoError(f"unknown {what} {value!r}; use one of {', '.join(choices)}")
    return value


def _memory_key(key, content):
    if key is None:
        words = re.findall(r"[a-z0-9]+", content.lower())[:6]
        return "-".join(words)[:60].strip("-") or "note-" + uuid.uuid4().hex[:6]
    if not isinstance(key, str) or not MEMORY_KEY_RE.fullmatch(key):
        raise CaoError(f"memory key {key!r} is not a slug; use letters, digits, '.', '_' and '-' "
                       "(up to 128 characters), such as prefer-pytest")
    return key


def _memory_json(row, score=None):
    result = {"id": str(row["id"]), "key": row["key"], "memory_type": row["memory_type"],
              "scope": row["scope"], "scope_id": row["scope_id"], "file_path": None,
              "tags": row["tags"], "source_provider": row["source_provider"],
              "source_terminal_id": row["source_terminal"], "content": row["content"],
              "created_at": _iso(row["created_at"]), "updated_at": _iso(row["updated_at"]),
              "access_count": row["access_count"]}
    if score is not None:
        result["score"] = round(score, 4)
    return result


class MemoryStore:
    """Memories in the server's database, with a full-text index kept by triggers."""

    def __init__(self, store):
        self.store = store
        self._projects = {}
        self.fts = self._full_text_index()

    def _full_text_index(self):
        """Create the FTS5 index if this sqlite has FTS5; False means search by LIKE."""
        import sqlite3
        try:
            with self.store.lock:
                fresh = not self.store.one("SELECT name FROM sqlite_master WHERE name = 'memories_fts'")
                self.store.db.executescript("""
                    CREATE VIRTUAL TABLE IF NOT EXISTS memories_fts USING fts5(
                        key, content, tags, content='memories', content_rowid='id');
                    CREATE TRIGGER IF NOT EXISTS memories_ai AFTER INSERT ON memories BEGIN
                        INSERT INTO memories_fts(rowid, key, content, tags)
                        VALUES (new.id, new.key, new.content, new.tags); END;
                    CREATE TRIGGER IF NOT EXISTS memories_ad AFTER DELETE ON memories BEGIN
                        INSERT INTO memories_fts(memories_fts, rowid, key, content, tags)
                        VALUES ('delete', old.id, old.key, old.content, old.tags); END;
                    CREATE TRIGGER IF NOT EXISTS memories_au AFTER UPDATE OF key, content, tags
                        ON memories BEGIN
                        INSERT INTO memories_fts(memories_fts, rowid, key, content, tags)
                        VALUES ('delete', old.id, old.key, old.content, old.tags);
                        INSERT INTO memories_fts(rowid, key, content, tags)
                        VALUES (new.id, new.key, new.content, new.tags); END;""")
                if fresh:
                    self.store.db.execute("INSERT INTO memories_fts(memories_fts) VALUES ('rebuild')")
            return True
        except sqlite3.OperationalError as e:
            if "fts5" not in str(e):
                raise
            return False

    # -- scopes ------------------------------------------------------------
    def project_of(self, workdir):
        override = os.environ.get("CAO_PROJECT_ID") or _memory_settings().get("project_id")
        if override:
            return str(override)
        if workdir not in self._projects:
            self._projects[workdir] = _git_remote(workdir) or str(Path(workdir).resolve())
        return self._projects[workdir]

    def scope_ids(self, row):
        """Scope -> scope id for a terminal row."""
        return {"global": "global", "project": self.project_of(row["working_directory"] or "/"),
                "session": row["session_name"], "agent": row["agent_profile"] or ""}

    # -- writing -----------------------------------------------------------
    def put(self, row, content, scope="project", memory_type="project", key=None, tags=None):
        if not isinstance(content, str) or not content.strip():
            raise CaoError("memory content is empty; pass the fact to remember as content")
        if len(content) > MAX_MEMORY:
            raise TooLarge(f"memory content is {len(content)} characters; the limit is {MAX_MEMORY}"
                           " (store a summary, or split it under several keys)")
        _choice(scope, MEMORY_SCOPES, "memory scope")
        _choice(memory_type, MEMORY_TYPES, "memory type")
        if tags is not None and not isinstance(tags, str):
            tags = ",".join(tags) if isinstance(tags, list) and all(
                isinstance(t, str) for t in tags) else None
            if tags is None:
                raise CaoError("tags must be a comma-separated string, such as \"testing,python\"")
        key = _memory_key(key, content)
        scope_id = self.scope_ids(row)[scope]
        now = time.time()
        with self.store.lock:
            old = self.store.one("SELECT id FROM memories WHERE scope = ? AND scope_id = ? AND key = ?",
                                 (scope, scope_id, key))
            if old:
                self.store.execute("UPDATE memories SET content = ?, memory_type = ?, tags = ?,"
                                   " updated_at = ?, source_terminal = ? WHERE id = ?",
                                   (content, memory_type, tags or "", now, row["id"], old["id"]))
            else:
                self.store.insert(
                    "INSERT INTO memories(scope, scope_id, key, memory_type, content, tags,"
                    " source_provider, source_terminal, created_at, updated_at)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?)", (scope, scope_id, key, memory_type, content,
                                                      tags or "", row["provider"], row["id"], now, now))
            memory = self._one(scope, scope_id, key)
        self.store.emit("memory_stored", row["session_name"], row["id"], key=key, scope=scope)
        return memory, "updated" if old else "created"

    def _one(self, scope, scope_id, key):
        row = self.store.one("SELECT * FROM memories WHERE scope = ? AND scope_id = ? AND key = ?",
                             (scope, scope_id, key))
        return _memory_json(row) if row else None

    def forget(self, row, key, scope="project"):
        _choice(scope, MEMORY_SCOPES, "memory scope")
        scope_id = self.scope_ids(row)[scope]
        if not self.store.execute("DELETE FROM memories WHERE scope = ? AND scope_id = ? AND key = ?",
                                  (scope, scope_id, key)):
            raise NotFound(f"no {scope} memory with key {key!r}; list them with memory_recall")
        return {"success": True, "key": key, "scope": scope, "scope_id": scope_id, "action": "deleted"}

    # -- reading -----------------------------------------------------------
    def recall(self, row, query=None, scope=None, memory_type=None, limit=10,
               search_mode="hybrid", sort_by=None, include_related=False):
        """Memories this terminal can see (its global, project, session and agent
        scopes), best first; recalling one counts as a use."""
        ids = self.scope_ids(row)
        scopes = [(_choice(scope, MEMORY_SCOPES, "memory scope"), ids[scope])] if scope else \
            [(s, ids[s]) for s in ("session", "agent", "project", "global")]
        found = self.search(scopes, query, memory_type, limit, search_mode, sort_by)
        if found:
            marks = ",".join("?" * len(found))
            self.store.execute(f"UPDATE memories SET access_count = access_count + 1,"
                               f" last_recalled = ? WHERE id IN ({marks})",
                               (time.time(), *[int(m["id"]) for m in found]))
        return found

    def search(self, scopes, query=None, memory_type=None, limit=10, search_mode="hybrid",
               sort_by=None):
        """Memories in any of `scopes` ([(scope, scope_id)]); None as a scope id means any."""
        _choice(search_mode, MEMORY_SEARCH_MODES, "search_mode")
        if memory_type is not None:
            _choice(memory_type, MEMORY_TYPES, "memory type")
        limit = int(limit)
        if not 1 <= limit <= 500:
            raise CaoError(f"limit={limit} is out of range; use 1 to 500")
        sort_by = _choice(sort_by or ("score" if query else "recency"), MEMORY_SORTS, "sort_by")
        where = " OR ".join("(m.scope = ? AND (? IS NULL OR m.scope_id = ?))" for _ in scopes)
        args = [a for s, sid in scopes for a in (s, sid, sid)]
        where = f"({where or '1'}) AND (? IS NULL OR m.memory_type = ?)"
        args += [memory_type, memory_type]
        order = {"recency": "m.updated_at DESC", "usage": "m.access_count DESC, m.updated_at DESC",
                 "score": "score, m.updated_at DESC"}[sort_by]
        words = re.findall(r"\w+", query or "")
        if words and self.fts and search_mode != "substring":
            # Notes with every word first (a narrow match, quick to rank), then any word.
            quoted = ['"' + w + '"' for w in words[:32]]
            rows = []
            for match in (" ".join(quoted), " OR ".join(quoted)) if len(quoted) > 1 else quoted:
                seen = {r["id"] for r in rows}
                rows += [r for r in self.store.query(
                    f"SELECT m.*, bm25(memories_fts) AS score FROM memories_fts JOIN memories m"
                    f" ON m.id = memories_fts.rowid WHERE memories_fts MATCH ? AND {where}"
                    f" ORDER BY {order} LIMIT ?", (match, *args, limit)) if r["id"] not in seen]
                if len(rows) >= limit:
                    break
            if rows or search_mode == "keyword":
                return [_memory_json(r, -r["score"]) for r in rows[:limit]]
        if words:  # no index, or nothing matched a word: any note containing one
            where += " AND (" + " OR ".join("m.content LIKE ? ESCAPE '\\' OR m.key LIKE ? ESCAPE '\\'"
                                            for _ in words[:32]) + ")"
            for w in words[:32]:
                pattern = "%" + w.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
                args += [pattern, pattern]
        order = order.replace("score, ", "")
        rows = self.store.query(f"SELECT m.* FROM memories m WHERE {where} ORDER BY {order} LIMIT ?",
                                (*args, limit))
        return [_memory_json(r) for r in rows]

    # -- operators (REST and `cao memory`) ---------------------------------
    def listing(self, scope=None, memory_type=None, scope_id=None, limit=100):
        scopes = [(_choice(scope, MEMORY_SCOPES, "memory scope"), scope_id)] if scope else \
            [(s, None) for s in MEMORY_SCOPES]
        return self.search(scopes, None, memory_type, limit)

    def get(self, key, scope=None, scope_id=None):
        rows = self.store.query(
            "SELECT * FROM memories WHERE key = ? AND (? IS NULL OR scope = ?)"
            " AND (? IS NULL OR scope_id = ?) ORDER BY updated_at DESC",
            (key, scope, scope, scope_id, scope_id))
        if not rows:
            raise NotFound(f"no memory with key {key!r}; list them with `cao memory list`")
        return [_memory_json(r) for r in rows]

    def delete(self, key, scope=None, scope_id=None):
        found = self.get(key, scope, scope_id)
        if len(found) > 1:
            where = ", ".join(f"{m['scope']} {m['scope_id']}" for m in found)
            raise Conflict(f"{len(found)} memories have key {key!r} ({where}); "
                           "pick one with --scope (and --scope-id)")
        self.store.execute("DELETE FROM memories WHERE id = ?", (int(found[0]["id"]),))
        return {"success": True, "deleted": found}

    def clear(self, scope, scope_id=None):
        _choice(scope, MEMORY_SCOPES, "memory scope")
        count = self.store.execute("DELETE FROM memories WHERE scope = ? AND (? IS NULL OR"
                                   " scope_id = ?)", (scope, scope_id, scope_id))
        return {"success": True, "deleted": count}

    # -- injection ---------------------------------------------------------
    def context(self, row, message=""):
        """The <cao-memory> block for a terminal's first message: per scope the notes
        most relevant to the message (else the newest), within MEMORY_BUDGET."""
        if not memory_enabled():
            return ""
        ids, parts = self.scope_ids(row), []
        for scope in ("global", "project", "agent", "session"):
            picked, used = [], 0
            found = self.search([(scope, ids[scope])], message, None, MEMORY_PER_SCOPE)
            if len(found) < MEMORY_PER_SCOPE and message:
                seen = {m["id"] for m in found}
                found += [m for m in self.search([(scope, ids[scope])], None, None, MEMORY_PER_SCOPE)
                          if m["id"] not in seen]
            for memory in found[:MEMORY_PER_SCOPE]:
                line = f"- [{memory['key']}] {' '.join(memory['content'].split())}"
                if used + len(line) > MEMORY_BUDGET:
                    line = line[:max(0, MEMORY_BUDGET - used - 1)] + "\u2026"
                    if len(line) < 40:
                        break
                picked.append(line)
                used += len(line)
            if picked:
                parts.append(f"## {scope} ({ids[scope]})\n" + "\n".join(picked))
        if not parts:
            return ""
        return ("<cao-memory>\nWhat earlier agents stored with memory_store (recall more with "
                "memory_recall):\n" + "\n".join(parts) + "\n</cao-memory>\n\n")

    def preface(self, row, message):
        """The first message a terminal gets, with its memories in front; the block
        sent is kept for GET /terminals/{id}/memory-context."""
        block = self.context(row, message)
        if len(block) + len(message) > MAX_MESSAGE:
            block = ""
        self.store.execute("UPDATE terminals SET memory_context = ? WHERE id = ?", (block, row["id"]))
        return block + message


@agent_tool("remember a fact for later sessions")
def memory_store(content: str, scope: str = "project", memory_type: str = "project",
                 key: str | None = None, tags: str | None = None) -> dict:
    """Store a fact that later agents should know. scope: global, project (default:
    this repository), session or agent. memory_type: user, feedback, project or
    reference. Storing again under the same key replaces the note. tags: comma-separated."""
    client = Client()
    result = client.memory_store(content=content, scope=scope, memory_type=memory_type, key=key,
                                 tags=tags, terminal_context={"terminal_id": own_terminal_id()})
    memory = result["memory"]
    return {"success": True, "key": memory["key"], "scope": memory["scope"],
            "scope_id": memory["scope_id"], "file_path": None, "action": result["action"]}


@agent_tool("search what earlier agents stored")
def memory_recall(query: str | None = None, scope: str | None = None,
                  memory_type: str | None = None, limit: int = 10,
                  search_mode: str = "hybrid", sort_by: str | None = None,
                  include_related: bool = False) -> dict:
    """Find stored memories, best match first (newest first without a query). Without a
    scope it searches this session, agent, project and global memories. search_mode:
    hybrid, keyword or substring; sort_by: score, recency or usage."""
    client = Client()
    found = client.memory_recall(query=query, scope=scope, memory_type=memory_type, limit=limit,
                                 search_mode=search_mode, sort_by=sort_by,
                                 include_related=include_related,
                                 terminal_context={"terminal_id": own_terminal_id()})["memories"]
    return {"success": True, "count": len(found), "memories": found}


@agent_tool("delete a stored memory")
def memory_forget(key: str, scope: str = "project") -> dict:
    """Delete the memory stored under key in scope (default project)."""
    client = Client()
    return client.memory_forget(key=key, scope=scope, terminal_context={"terminal_id": own_terminal_id()})


###############################################################################
# Skills ######################################################################
###############################################################################

# A skill is a folder holding SKILL.md: frontmatter `name` (the folder's name) and
# `description`, then the guide itself. cao keeps them in CAO_HOME_DIR/skills,
# reads more from settings.json skills.extra_dirs, and gives each agent the ones
# its profile's `skills:` patterns allow: in the CLI's own skill folder where its
# provider entry names one, else as a catalog in the system prompt that the agent
# opens with the load_skill tool.

SKILL_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
BUILTIN_SKILLS = ("cao-supervisor-protocols", "cao-worker-protocols")
MAX_SKILL_FILES, MAX_SKILL_BYTES = 500, 10 << 20
SEED_MARK = ".cao-seeded"


def _skill_meta(folder):
    """(name, description, body) of the skill in folder; an error names the fix."""
    manifest = folder / "SKILL.md"
    if not manifest.is_file() or manifest.is_symlink():
        raise CaoError(f"{folder} has no SKILL.md; a skill is a folder with a SKILL.md file")
    try:
        text = read_inside(manifest, folder)
    except OSError as e:
        raise CaoError(f"{manifest}: {e.strerror or e}")
    meta, body = parse_frontmatter(text, str(manifest))
    name, description = meta.get("name"), meta.get("description")
    if not isinstance(name, str) or not SKILL_NAME_RE.fullmatch(name):
        raise CaoError(f"{manifest}: frontmatter `name` must be a lowercase name such as "
                       f"code-review (got {name!r})")
    if name != folder.name:
        raise CaoError(f"{manifest}: name {name!r} differs from its folder {folder.name!r}; "
                       "rename one to match")
    if not isinstance(description, str) or not description.strip():
        raise CaoError(f"{manifest}: frontmatter needs a `description` that says when to use it")
    return name, " ".join(description.split()), body.strip() + "\n"


def _check_skill_tree(folder):
    """No links and nothing huge inside a skill that is about to be copied."""
    count = size = 0
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            raise CaoError(f"{path} is a symbolic link; a skill holds plain files only")
        if path.is_file():
            count, size = count + 1, size + path.stat().st_size
        elif not path.is_dir():
            raise CaoError(f"{path} is not a plain file; a skill holds plain files only")
    if count > MAX_SKILL_FILES or size > MAX_SKILL_BYTES:
        raise CaoError(f"{folder} holds {count} files and {size} bytes; a skill may hold up to "
                       f"{MAX_SKILL_FILES} files and {MAX_SKILL_BYTES >> 20} MiB")


def skill_dirs():
    """settings.json skills.extra_dirs, each an existing folder."""
    setting = load_settings().get("skills") or {}
    extra = setting.get("extra_dirs", []) if isinstance(setting, dict) else None
    if not isinstance(extra, list) or not all(isinstance(d, str) and d for d in extra):
        raise ConfigError("settings.json: skills.extra_dirs must be a list of folder paths")
    return [Path(d).expanduser() for d in extra]


class SkillStore:
    """The installed skills: CAO_HOME_DIR/skills first, then the extra folders."""

    def __init__(self, root):
        self.root = Path(root)

    def _folders(self):
        yield "cao", self.root
        for extra in skill_dirs():
            yield str(extra), extra

    def all(self):
        """name -> skill; a name the store has wins over the same name in an extra folder.
        A folder that is not a valid skill is listed in `problems`."""
        skills, self.problems = {}, []
        for source, base in self._folders():
            if not base.is_dir():
                continue
            for folder in sorted(base.iterdir()):
                if not folder.is_dir() or folder.name.startswith("."):
                    continue
                try:
                    name, description, _ = _skill_meta(folder)
                except CaoError as e:
                    self.problems.append(str(e))
                    continue
                skills.setdefault(name, {"name": name, "description": description,
                                         "source": source, "path": str(folder)})
        return skills

    def listing(self):
        return sorted(self.all().values(), key=lambda s: s["name"])

    def get(self, name):
        if not isinstance(name, str) or not SKILL_NAME_RE.fullmatch(name):
            raise CaoError(f"invalid skill name {name!r}; skill names are lowercase letters, "
                           "digits, '.', '_' and '-'")
        skill = self.all().get(name)
        if not skill:
            raise NotFound(f"skill {name!r} is not installed; see `cao skills list`")
        _, description, body = _skill_meta(Path(skill["path"]))
        return {**skill, "content": body}

    def for_profile(self, profile):
        """The skills a profile's `skills:` patterns allow (all without the key)."""
        import fnmatch
        wanted = profile.get("skills")
        if wanted is not None and not (isinstance(wanted, list) and all(
                isinstance(p, str) for p in wanted)):
            raise ProfileError(f"profile {profile['name']}: skills must be a list of skill "
                               "names or patterns, such as [cao-worker-protocols, review-*]")
        return [s for s in self.listing()
                if wanted is None or any(fnmatch.fnmatchcase(s["name"], p) for p in wanted)]

    def add(self, source, force=False):
        folder = Path(source).expanduser()
        if folder.is_symlink() or not folder.is_dir():
            raise CaoError(f"{source} is not a folder; pass the skill's folder (holding SKILL.md)")
        folder = folder.resolve()
        name, _, _ = _skill_meta(folder)
        _check_skill_tree(folder)
        target = self.root / name
        if target.exists() and not force:
            raise Conflict(f"skill {name} is already installed; add --force to replace it")
        self.root.mkdir(parents=True, exist_ok=True)
        staged = self.root / f".{name}.{uuid.uuid4().hex[:8]}.new"
        shutil.copytree(folder, staged)
        old = None
        if target.exists():
            old = self.root / f".{name}.{uuid.uuid4().hex[:8]}.old"
            target.rename(old)
        staged.rename(target)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        return {"name": name, "path": str(target), "replaced": old is not None}

    def remove(self, name):
        if not isinstance(name, str) or not SKILL_NAME_RE.fullmatch(name):
            raise CaoError(f"invalid skill name {name!r}")
        target = self.root / name
        if not (target / "SKILL.md").is_file() or target.is_symlink():
            raise NotFound(f"skill {name} is not in {self.root}; see `cao skills list` "
                           "(skills in extra folders are removed there)")
        shutil.rmtree(target)
        return {"name": name, "removed": True}

    def seed(self):
        """Install the built-in skills; a copy the user has edited is left alone."""
        import hashlib
        for name in BUILTIN_SKILLS:
            packaged = read_resource(f".skills/{name}/SKILL.md")
            if packaged is None:
                continue
            target = self.root / name
            manifest, mark = target / "SKILL.md", target / SEED_MARK
            if target.exists():
                try:
                    seeded = read_inside(mark, target).strip()
                    current = hashlib.sha256(read_inside(manifest, target).encode()).hexdigest()
                except (OSError, CaoError):
                    continue  # no mark: the user made or replaced it
                if seeded != current or current == hashlib.sha256(packaged).hexdigest():
                    continue  # edited by the user, or already the newest
            target.mkdir(parents=True, exist_ok=True)
            write_inside(manifest, self.root, packaged, mode=0o644)
            write_inside(mark, self.root, hashlib.sha256(packaged).hexdigest() + "\n")

    def catalog(self, skills):
        if not skills:
            return ""
        lines = "\n".join(f"- **{s['name']}**: {s['description']}" for s in skills)
        return ("## Skills\nThese skills come with this cao session. When a task matches one, "
                f"call the load_skill tool of {CAO_MCP_NAME} with its name to read it; they are "
                "not in your CLI's own skill list.\n" + lines)

    def deliver(self, profile, spec, fields):
        """Give a new terminal its skills: copies in the CLI's own skill folder, or a
        catalog in its system prompt."""
        skills = self.for_profile(profile)
        native = spec.get("skills_dir")
        if native:
            target = Path(_fill(native, fields))
            if not within(target, fields["context_dir"]):
                raise ConfigError(f"skills_dir {native!r} must lie in the terminal's own folder "
                                  "({context_dir}/...)")
            for skill in skills:
                shutil.copytree(skill["path"], target / skill["name"], symlinks=False,
                                dirs_exist_ok=True)
            fields.update(skills=bool(skills), skills_dir=str(target))
            return
        if not skills:
            return
        fields["system_prompt"] = "\n\n".join(
            p for p in (fields["system_prompt"], self.catalog(skills)) if p)


@agent_tool("read one of the session's skills")
def load_skill(name: str) -> str:
    """The full guide of a skill from the catalog in your instructions."""
    return Client().skill(name)["content"]


###############################################################################
# Flows #######################################################################
###############################################################################

# A flow starts an agent session on a cron schedule: Markdown with frontmatter
# `name`, `schedule` (5-field cron), `agent_profile`, optional `provider` and
# `script`; the body is the prompt, whose [[key]]s a gating script fills. Files
# live in CAO_HOME_DIR/flows; their last and next runs are in the database. The
# scheduler sleeps until the next due time, and a run missed while the server
# was down happens once when it starts.

FLOW_SCRIPT_TIMEOUT = 30.0
_PLACEHOLDER = re.compile(r"\[\[(\w+)\]\]")
FLOW_FIELDS = ("name", "schedule", "agent_profile", "provider", "script")


def next_cron_time(schedule, after):
    """The first time after `after` (epoch seconds) that a 5-field cron line names."""
    croniter = import_optional("croniter", "flows").croniter
    if not isinstance(schedule, str) or len(schedule.split()) != 5 or not croniter.is_valid(schedule):
        raise CaoError(f"schedule {schedule!r} is not a 5-field cron line; use one such as "
                       "\"30 7 * * 1-5\" (minute hour day month weekday)")
    import datetime
    start = datetime.datetime.fromtimestamp(after)
    return croniter(schedule, start).get_next(float)


def check_flow(fields, where="flow"):
    """The flow's fields, checked; a problem names the field and the fix."""
    name = fields.get("name")
    if not isinstance(name, str) or not PROFILE_NAME_RE.fullmatch(name):
        raise CaoError(f"{where}: name {name!r} must be 1-64 letters, digits, _ or -")
    _check_profile_name(fields.get("agent_profile"))
    next_cron_time(fields.get("schedule"), time.time())
    provider = fields.get("provider")
    if provider is not None:
        get_provider(provider)
    script = fields.get("script")
    if script is not None and (not isinstance(script, str) or not script):
        raise CaoError(f"{where}: script must be a path to an executable file")
    prompt = fields.get("prompt_template")
    if not isinstance(prompt, str) or not prompt.strip():
        raise CaoError(f"{where}: the prompt (the file's body, or prompt_template) is empty")
    check_message(prompt)
    return {k: fields.get(k) for k in FLOW_FIELDS} | {"prompt_template": prompt.strip() + "\n"}


def flow_file_text(flow):
    """A flow file; every value is written as a JSON string, which YAML reads back as
    the same string, so no value can add a line of frontmatter."""
    front = "".join(f"{k}: {json.dumps(flow[k])}\n" for k in FLOW_FIELDS if flow.get(k) is not None)
    return f"---\n{front}---\n{flow['prompt_template']}"


def read_flow_file(path):
    meta, body = parse_frontmatter(Path(path).read_text(encoding="utf-8"), str(path))
    return {**{k: meta.get(k) for k in FLOW_FIELDS}, "prompt_template": body}


def run_flow_script(script, root, timeout):
    """{"execute": bool, "output": {...}} from a gating script; a problem is a CaoError."""
    path = Path(script)
    if not within(path, root) or not path.is_file() or not os.access(path, os.X_OK):
        raise CaoError(f"script {script} must be an executable file inside {root}")
    try:
        done = subprocess.run([str(path)], cwd=str(root), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise CaoError(f"script {path.name} ran longer than {timeout:g} s")
    except OSError as e:
        raise CaoError(f"script {path.name} could not run: {e.strerror}")
    if done.returncode != 0:
        tail = " ".join(done.stderr.split())[-200:]
        raise CaoError(f"script {path.name} exited with {done.returncode}: {tail or '(no stderr)'}")
    try:
        result = json.loads(done.stdout)
    except ValueError:
        raise CaoError(f"script {path.name} printed no JSON object "
                       '(want {"execute": true, "output": {...}})')
    if not isinstance(result, dict) or not isinstance(result.get("execute"), bool) or \
            not isinstance(result.get("output", {}), dict):
        raise CaoError(f"script {path.name} must print {{\"execute\": true|false, \"output\": {{...}}}}")
    return result


def fill_prompt(template, values):
    missing = sorted({k for k in _PLACEHOLDER.findall(template) if k not in values})
    if missing:
        raise CaoError(f"the prompt uses [[{']], [['.join(missing)}]] but the script's output has "
                       "no such key")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), template)


class Flows(threading.Thread):
    """The flows and their scheduler: one thread that sleeps until the next flow is
    due (or a change wakes it), then starts each due flow in its own thread."""

    def __init__(self, store, sessions):
        super().__init__(daemon=True, name="flows")
        self.store, self.sessions = store, sessions
        self.root = ensure_home() / "flows"
        self.wake = threading.Event()
        self.running, self.guard = set(), threading.Lock()
        self.stopping = False

    # -- the flow table ------------------------------------------------------
    def _json(self, row):
        flow = {"name": row["name"], "file_path": row["file_path"], "schedule": row["schedule"],
                "agent_profile": row["agent_profile"], "provider": row["provider"],
                "engine": None, "script": row["script"], "enabled": bool(row["enabled"]),
                "last_run": _iso(row["last_run"]), "next_run": _iso(row["next_run"]),
                "last_result": row["last_result"], "last_reason": row["last_reason"],
                "running": row["name"] in self.running}
        try:
            flow["prompt_template"] = read_flow_file(row["file_path"])["prompt_template"]
        except (OSError, CaoError) as e:
            flow["prompt_template"], flow["error"] = None, str(e)
        return flow

    def _row(self, name):
        row = self.store.one("SELECT * FROM flows WHERE name = ?", (name,))
        if not row:
            raise NotFound(f"flow {name!r} not found; list flows with `cao flow list`")
        return row

    def adopt_upstream(self):
        """Take in flows that upstream's `cao schedule add` wrote to its own database in
        this home (it runs in-process, without a server); each is added once."""
        import sqlite3
        path = cao_home() / "db" / "cli-agent-orchestrator.db"
        try:
            stamp = os.stat(path).st_mtime_ns
        except OSError:
            return
        if stamp == getattr(self, "_upstream_stamp", None):
            return
        self._upstream_stamp = stamp
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2) as db:
                rows = db.execute("SELECT name, file_path FROM flows").fetchall()
        except sqlite3.Error:
            return
        known = {r["name"] for r in self.store.query("SELECT name FROM flows")}
        for name, file_path in rows:
            if name in known:
                continue
            try:
                flow = read_flow_file(file_path)
                if flow.get("script"):
                    flow["script"] = None  # run only scripts added with `cao flow add`
                    raise CaoError("its script was not copied in; add it with `cao flow add`")
                self.add(flow)
            except (OSError, CaoError) as e:
                print(f"cao: upstream flow {name} not taken in: {e}", file=sys.stderr, flush=True)

    def listing(self):
        self.adopt_upstream()
        return [self._json(r) for r in self.store.query("SELECT * FROM flows ORDER BY name")]

    def get(self, name):
        return self._json(self._row(name))

    def add(self, fields):
        flow = check_flow(fields)
        if flow["script"] is not None:
            script = Path(flow["script"])
            flow["script"] = str(script if script.is_absolute() else self.root / script)
            if not within(flow["script"], self.root):
                raise CaoError(f"script {fields['script']} must be inside {self.root}; "
                               "`cao flow add FILE` copies a flow's script there")
        path = self.root / f"{flow['name']}.flow.md"
        write_inside(path, ensure_home(), flow_file_text(flow), mode=0o644)
        next_run = next_cron_time(flow["schedule"], time.time())
        with self.store.lock:
            self.store.execute("DELETE FROM flows WHERE name = ?", (flow["name"],))
            self.store.insert(
                "INSERT INTO flows(name, file_path, schedule, agent_profile, provider, script,"
                " enabled, next_run) VALUES (?,?,?,?,?,?,1,?)",
                (flow["name"], str(path), flow["schedule"], flow["agent_profile"],
                 flow["provider"], flow["script"], next_run))
        self.wake.set()
        return self.get(flow["name"])

    def remove(self, name):
        row = self._row(name)
        self.store.execute("DELETE FROM flows WHERE name = ?", (name,))
        try:
            os.unlink(row["file_path"])
        except OSError:
            pass
        return {"success": True}

    def enable(self, name, enabled):
        row = self._row(name)
        next_run = next_cron_time(row["schedule"], time.time()) if enabled else row["next_run"]
        self.store.execute("UPDATE flows SET enabled = ?, next_run = ? WHERE name = ?",
                           (int(enabled), next_run, name))
        self.wake.set()
        return {"success": True}

    # -- running ---------------------------------------------------------------
    def run_flow(self, name):
        """Run a flow now: gate, fill the prompt, start its session. Returns the outcome;
        a failure is recorded with its reason, never raised at the scheduler."""
        row = self._row(name)
        with self.guard:
            if name in self.running:
                return self._record(row, "busy", "the previous run is still starting")
            self.running.add(name)
        try:
            return self._run(row)
        except CaoError as e:
            return self._record(row, "failed", str(e))
        finally:
            with self.guard:
                self.running.discard(name)

    def _run(self, row):
        flow = read_flow_file(row["file_path"])
        values = {}
        if row["script"]:
            timeout = float(os.environ.get("CAO_FLOW_SCRIPT_TIMEOUT") or FLOW_SCRIPT_TIMEOUT)
            gate = run_flow_script(row["script"], self.root, timeout)
            if not gate["execute"]:
                return self._record(row, "skipped", "the script said execute: false")
            values = gate.get("output", {})
        prompt = fill_prompt(flow["prompt_template"], values)
        session = f"{SESSION_PREFIX}flow-{row['name']}"
        old = self.store.one("SELECT id FROM terminals WHERE session_name = ? ORDER BY created_at"
                             " LIMIT 1", (session,))
        if old and self.sessions.terminals.tracker.status(old["id"]) == "processing":
            return self._record(row, "busy", f"its last session {session} is still working")
        if old or session in tmux_sessions():
            self.sessions.terminals.end_session(session)
            for term in self.store.query("SELECT id FROM terminals WHERE session_name = ?", (session,)):
                self.sessions.terminals.forget(term["id"], "its flow ran again")
        term = self.sessions.create(row["agent_profile"], row["provider"], session,
                                    initial_message=prompt)
        return self._record(row, "executed", None, session=session, terminal_id=term["id"])

    def _record(self, row, result, reason, **more):
        now = time.time()
        self.store.execute("UPDATE flows SET last_run = ?, last_result = ?, last_reason = ?"
                           " WHERE name = ?", (now, result, reason, row["name"]))
        self.store.emit("flow_run", more.get("session"), more.get("terminal_id"),
                        flow=row["name"], result=result, reason=reason)
        return {"success": result != "failed", "executed": result == "executed",
                "result": result, "reason": reason, **more}

    # -- the scheduler -----------------------------------------------------------
    def run(self):
        while not self.stopping:
            self.adopt_upstream()
            now = time.time()
            due = self.store.query("SELECT * FROM flows WHERE enabled = 1 AND next_run <= ?", (now,))
            for row in due:
                try:  # a missed run happens once, however many times it was due
                    next_run = next_cron_time(row["schedule"], now)
                except CaoError:
                    next_run = None
                self.store.execute("UPDATE flows SET next_run = ? WHERE name = ?",
                                   (next_run, row["name"]))
                threading.Thread(target=self.run_flow, args=(row["name"],), daemon=True,
                                 name=f"flow-{row['name']}").start()
            soonest = self.store.one("SELECT MIN(next_run) AS t FROM flows WHERE enabled = 1")["t"]
            # Wake at least each minute to take in flows upstream's CLI added.
            self.wake.wait(60 if soonest is None else max(0.0, min(60, soonest - time.time())))
            self.wake.clear()

    def stop(self):
        self.stopping = True
        self.wake.set()


###############################################################################
# Plugins and webhooks ########################################################
###############################################################################

# Observers of what happens in cao. Each plugin (and each webhook) follows the
# event log in its own thread, from its own cursor: it runs off every request's
# path, a slow or failing one holds up only itself, and none misses an event.
# Plugins written for upstream cao load unchanged: without upstream installed,
# `cli_agent_orchestrator.plugins` is provided here with the same names.

PLUGIN_GROUP = "cao.plugins"
PLUGIN_TIMEOUT = 10.0
HOOK_MARK = "_cao_hook_event"  # the attribute upstream's hook() sets on a method
WEBHOOK_FORMATS = ("json", "discord", "slack", "telegram")
PLUGIN_EVENTS = ("post_send_message", "post_create_session", "post_kill_session",
                 "post_create_terminal", "post_kill_terminal", "post_status_change")


PLUGIN_EVENT_KINDS = ("session_created", "session_deleted", "terminal_created",
                      "terminal_deleted", "message_sent", "status")


def plugin_event(event):
    """(event type, fields) of a plugin event for one row of the event log, or None."""
    data, session = event["data"], event["session_name"]
    kind, terminal = event["kind"], event["terminal_id"]
    if kind == "session_created":
        return "post_create_session", {"session_name": session}
    if kind == "session_deleted":
        return "post_kill_session", {"session_name": session}
    if kind == "terminal_created":
        return "post_create_terminal", {"terminal_id": terminal, "agent_name": data.get("agent_profile"),
                                        "provider": data.get("provider", "")}
    if kind == "terminal_deleted":
        return "post_kill_terminal", {"terminal_id": terminal, "agent_name": data.get("agent_profile")}
    if kind == "message_sent":
        return "post_send_message", {"sender": data["sender"], "receiver": terminal,
                                     "message": data["message"],
                                     "orchestration_type": data["orchestration_type"]}
    if kind == "status":
        return "post_status_change", {"terminal_id": terminal, "status": data["status"],
                                      "previous": data.get("previous")}
    return None


def _plugin_api():
    """The module plugins import: upstream's if it is installed, else cao's stand-in."""
    try:
        import cli_agent_orchestrator.plugins as api
        return api
    except ImportError:
        pass
    import dataclasses
    import datetime
    import types

    def _now():
        return datetime.datetime.now(datetime.timezone.utc)

    @dataclasses.dataclass
    class CaoEvent:
        event_type: str = ""
        timestamp: datetime.datetime = dataclasses.field(default_factory=_now)
        session_id: str | None = None
        traceparent: str | None = None

    def event_class(name, event_type, **fields):
        annotations = {"event_type": str, **{k: type(v) if v is not None else str | None
                                             for k, v in fields.items()}}
        namespace = {"__annotations__": annotations, "event_type": event_type, **fields}
        return dataclasses.dataclass(type(name, (CaoEvent,), namespace))

    class CaoPlugin:
        """Base of a cao plugin: async setup() and teardown(), on_mcp_server(mcp), and
        async methods marked @hook("event_type")."""
        async def setup(self):
            pass

        async def teardown(self):
            pass

        def on_mcp_server(self, mcp):
            pass

    def hook(event_type):
        def mark(method):
            setattr(method, HOOK_MARK, event_type)
            return method
        return mark

    api = types.ModuleType("cli_agent_orchestrator.plugins")
    api.CaoPlugin, api.hook, api.CaoEvent = CaoPlugin, hook, CaoEvent
    api.PostSendMessageEvent = event_class("PostSendMessageEvent", "post_send_message", sender="",
                                           receiver="", message="", orchestration_type="")
    api.PostCreateSessionEvent = event_class("PostCreateSessionEvent", "post_create_session",
                                             session_name="")
    api.PostKillSessionEvent = event_class("PostKillSessionEvent", "post_kill_session",
                                           session_name="")
    api.PostCreateTerminalEvent = event_class("PostCreateTerminalEvent", "post_create_terminal",
                                              terminal_id="", agent_name=None, provider="")
    api.PostKillTerminalEvent = event_class("PostKillTerminalEvent", "post_kill_terminal",
                                            terminal_id="", agent_name=None)
    api.PostStatusChangeEvent = event_class("PostStatusChangeEvent", "post_status_change",
                                            terminal_id="", status="", previous=None)
    package = types.ModuleType("cli_agent_orchestrator")
    package.__path__, package.plugins = [], api
    sys.modules.setdefault("cli_agent_orchestrator", package)
    sys.modules.setdefault("cli_agent_orchestrator.plugins", api)
    return api


_EVENT_CLASSES = {"post_send_message": "PostSendMessageEvent",
                  "post_create_session": "PostCreateSessionEvent",
                  "post_kill_session": "PostKillSessionEvent",
                  "post_create_terminal": "PostCreateTerminalEvent",
                  "post_kill_terminal": "PostKillTerminalEvent",
                  "post_status_change": "PostStatusChangeEvent"}


class EventFollower(threading.Thread):
    """Follows the event log from a cursor and hands each plugin event to deliver()."""

    def __init__(self, store, name, cursor):
        super().__init__(daemon=True, name=f"plugin-{name}")
        self.store, self.label, self.cursor = store, name, cursor
        self.stats = {"delivered": 0, "failed": 0, "timed_out": 0, "lost": 0, "last_error": None}
        self.stopping = False

    def run(self):
        self.store.holds[id(self)] = self.cursor
        while not self.stopping:
            for event in self.store.events_after(self.cursor, wait=5.0):
                if event["seq"] > self.cursor + 1 and self.cursor:
                    self.lost(event["seq"] - self.cursor - 1)
                self.cursor = event["seq"]
                mapped = plugin_event(event)
                if mapped:
                    try:
                        self.deliver(*mapped, event)
                    except Exception as e:  # one observer's fault never stops the others
                        self.failed(e)
                self.store.holds[id(self)] = self.cursor
        self.store.holds.pop(id(self), None)

    def lost(self, count):
        """Events pruned before this reader got to them (it fell EVENTS_HELD_MAX behind)."""
        self.stats["lost"] += count
        print(f"cao: plugin {self.label}: {count} events were dropped before it read them "
              "(it is too far behind)", file=sys.stderr, flush=True)

    def failed(self, error, timed_out=False):
        self.stats["timed_out" if timed_out else "failed"] += 1
        self.stats["last_error"] = f"{type(error).__name__}: {error}"[:300]
        print(f"cao: plugin {self.label}: {self.stats['last_error']}", file=sys.stderr, flush=True)

    def info(self):
        behind = self.store.one(f"SELECT COUNT(*) AS n FROM events WHERE seq > ? AND kind IN "
                                f"({','.join('?' * len(PLUGIN_EVENT_KINDS))})",
                                (self.cursor, *PLUGIN_EVENT_KINDS))["n"]
        return {"name": self.label, "behind": behind, **self.stats}


class PluginRunner(EventFollower):
    """One plugin: its own thread and asyncio loop; each hook call has a time limit."""

    def __init__(self, store, name, source, plugin, cursor):
        super().__init__(store, name, cursor)
        self.source, self.plugin = source, plugin
        self.hooks = {}
        for attr in dir(type(plugin)):
            method = getattr(plugin, attr, None)
            event_type = getattr(method, HOOK_MARK, None)
            if event_type:
                self.hooks.setdefault(event_type, []).append(method)
        self.timeout = float(os.environ.get("CAO_PLUGIN_TIMEOUT") or PLUGIN_TIMEOUT)
        self.api = _plugin_api()

    def _call(self, function, *args):
        import asyncio
        result = function(*args)
        if asyncio.iscoroutine(result):
            self.loop.run_until_complete(asyncio.wait_for(result, self.timeout))

    def run(self):
        import asyncio
        self.loop = asyncio.new_event_loop()
        try:
            self._call(self.plugin.setup)
        except Exception as e:
            self.failed(e)
        super().run()
        try:
            self._call(self.plugin.teardown)
        except Exception as e:
            self.failed(e)
        self.loop.close()

    def deliver(self, event_type, fields, event):
        import asyncio
        for method in self.hooks.get(event_type, ()):
            cls = getattr(self.api, _EVENT_CLASSES[event_type], None)
            payload = cls(session_id=event["session_name"], **fields) if cls else fields
            try:
                self._call(method, payload)
                self.stats["delivered"] += 1
            except asyncio.TimeoutError:
                self.failed(TimeoutError(f"{event_type} took over {self.timeout:g} s"), True)
            except Exception as e:
                self.failed(e)

    def info(self):
        return {**super().info(), "source": self.source, "events": sorted(self.hooks)}


class WebhookRunner(EventFollower):
    """Posts events to a URL in the receiving service's own format, with retries."""

    def __init__(self, store, number, spec, cursor):
        self.url, self.format = spec["url"], spec.get("format", "json")
        super().__init__(store, f"webhook-{number + 1}", cursor)
        self.events = set(spec.get("events") or PLUGIN_EVENTS)
        self.chat_id = spec.get("chat_id")
        self.retries = int(spec.get("retries", 3))
        self.timeout = float(spec.get("timeout", 5))
        self.backoff = float(spec.get("backoff", 1.0))

    def _payload(self, event_type, fields, event):
        text = f"[cao] {event_type}: " + ", ".join(
            f"{k}={' '.join(str(v).split())[:300]}" for k, v in fields.items() if v is not None)
        if self.format == "discord":
            return {"content": text[:2000]}
        if self.format == "slack":
            return {"text": text}
        if self.format == "telegram":
            return {"chat_id": self.chat_id, "text": text[:4096]}
        return {"event_type": event_type, "timestamp": _iso(event["ts"]),
                "session_id": event["session_name"], **fields}

    def deliver(self, event_type, fields, event):
        import http.client  # only here and in the Client: it is slow to import
        import urllib.request
        if event_type not in self.events:
            return
        body = json.dumps(self._payload(event_type, fields, event)).encode()
        error = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                request = urllib.request.Request(self.url, data=body, method="POST",
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    answer.read()
                self.stats["delivered"] += 1
                return
            except (OSError, ValueError, http.client.HTTPException) as e:
                error = e
        self.failed(error)

    def info(self):
        return {**super().info(), "url": self.url, "format": self.format}


def webhook_specs():
    """settings.json `webhooks`: [{"url", "format", "events", "chat_id", ...}], checked."""
    specs = load_settings().get("webhooks") or []
    if not isinstance(specs, list):
        raise ConfigError("settings.json: webhooks must be a list of {\"url\": ..., \"format\": ...}")
    for number, spec in enumerate(specs):
        where = f"settings.json: webhooks[{number}]"
        if not isinstance(spec, dict) or not isinstance(spec.get("url"), str) or \
                not re.match(r"https?://[^\s/]+", spec["url"]):
            raise ConfigError(f"{where} needs a url starting with http:// or https://")
        if spec.get("format", "json") not in WEBHOOK_FORMATS:
            raise ConfigError(f"{where}: format must be one of {', '.join(WEBHOOK_FORMATS)}")
        unknown = set(spec.get("events") or ()) - set(PLUGIN_EVENTS)
        if unknown:
            raise ConfigError(f"{where}: unknown events {', '.join(sorted(unknown))}; use "
                              f"{', '.join(PLUGIN_EVENTS)}")
        if spec.get("format") == "telegram" and not spec.get("chat_id"):
            raise ConfigError(f"{where}: telegram needs a chat_id")
    return specs


class Plugins:
    """Loads the plugins (entry points in `cao.plugins`, .py files in
    CAO_HOME_DIR/plugins) and the webhooks, and runs each in its own follower."""

    def __init__(self, store):
        self.store, self.runners, self.problems = store, [], []

    def _found(self):
        """(name, source, class) of every plugin; a plugin that fails to load is reported."""
        import importlib.metadata
        import importlib.util
        _plugin_api()
        try:
            points = importlib.metadata.entry_points(group=PLUGIN_GROUP)
        except TypeError:  # Python 3.10 and 3.11 before the group keyword
            points = importlib.metadata.entry_points().get(PLUGIN_GROUP, [])
        for point in points:
            try:
                yield point.name, f"entry point {point.value}", point.load()
            except Exception as e:
                self.problems.append(f"plugin {point.name} ({point.value}): {type(e).__name__}: {e}")
        folder = cao_home() / "plugins"
        for path in sorted(folder.glob("*.py")) if folder.is_dir() else ():
            try:
                spec = importlib.util.spec_from_file_location(f"cao_plugin_{path.stem}", path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            except Exception as e:
                self.problems.append(f"plugin file {path}: {type(e).__name__}: {e}")
                continue
            base = _plugin_api().CaoPlugin
            for value in vars(module).values():
                if isinstance(value, type) and issubclass(value, base) and value is not base \
                        and value.__module__ == module.__name__:
                    yield value.__name__, str(path), value

    def start(self):
        cursor = self.store.last_event_seq()
        for name, source, cls in self._found():
            try:
                runner = PluginRunner(self.store, name, source, cls(), cursor)
            except Exception as e:
                self.problems.append(f"plugin {name}: {type(e).__name__}: {e}")
                continue
            self.runners.append(runner)
        for number, spec in enumerate(webhook_specs()):
            self.runners.append(WebhookRunner(self.store, number, spec, cursor))
        for problem in self.problems:
            print(f"cao: {problem}", file=sys.stderr, flush=True)
        for runner in self.runners:
            runner.start()

    def stop(self):
        for runner in self.runners:
            runner.stopping = True

    def listing(self):
        return {"plugins": [r.info() for r in self.runners], "problems": self.problems}


###############################################################################
# Application #################################################################
###############################################################################

class App:
    """The server's parts, made and wired in one place. A feature that reacts to
    what happens to terminals subscribes to `bus` here."""

    def __init__(self, store, host, port):
        home = ensure_home()
        self.store, self.bus, self.live = store, Bus(), {}
        self.watcher = PaneWatcher(home / "fifos", home / "logs" / "terminal",
                                   lambda terminal_id: self.tracker.refresh(terminal_id))
        self.tracker = StatusTracker(store, self.bus, self.live, self.watcher,
                                     gone=lambda terminal_id, why: self.resumer.gone(terminal_id, why))
        self.typist = TerminalInput(store, self.live, self.watcher, self.tracker)
        self.launcher = Launcher(home, host, port)
        self.capacity = Capacity(store)
        self.terminals = Terminals(store, self.bus, self.live, self.watcher, self.tracker,
                                   self.typist, self.launcher, self.capacity)
        self.sessions = Sessions(store, self.terminals)
        self.inbox = Inbox(store, self.bus, self.tracker, self.terminals, self.typist)
        self.handoffs = Handoffs(store, self.bus, self.terminals, self.typist, self.tracker,
                                 self.inbox)
        self.resumer = Resumer(store, self.bus, self.live, self.watcher, self.tracker,
                               self.terminals, self.launcher)
        self.watchdog = Watchdog(store, self.bus, self.live, self.watcher, self.tracker,
                                 self.inbox, excused=self.resumer.starting)
        self.memory = MemoryStore(store)
        self.typist.first_input = self.memory.preface
        self.skills = SkillStore(ensure_home() / "skills")
        self.launcher.hooks.append(self.skills.deliver)
        self.flows = Flows(store, self.sessions)
        self.plugins = Plugins(store)

    def start(self):
        self.skills.seed()
        self.resumer.recover()
        self.watcher.start()
        self.inbox.recover()
        self.handoffs.recover()
        if load_settings().get("resume_on_start", True) is not False:
            threading.Thread(target=self._resume_lost, daemon=True, name="cao-resume").start()
        self.plugins.start()
        self.flows.start()
        self.watchdog.start()

    def _resume_lost(self):
        try:
            self.resumer.resume_all()
        except CaoError as e:
            self.store.emit("resume_failed", reason=str(e))

    def stop(self):
        self.watchdog.stop()
        self.flows.stop()
        self.plugins.stop()
        self.watcher.stop()
        self.watcher.join(timeout=5)
        self.store.close()


###############################################################################
# HTTP API ####################################################################
###############################################################################

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
MAX_BODY = 1 << 20
# Limits for clients that hold connections open (docs/security.md).
HTTP_REQUEST_TIMEOUT = 10.0  # a request's line, headers and body must arrive within this
HTTP_IDLE_TIMEOUT = 30.0     # a kept-alive connection may wait this long for its next request
HTTP_WRITE_TIMEOUT = 30.0    # a client that stops reading its answer is dropped after this
MAX_CONNECTIONS_PER_CLIENT = 128
MAX_CONNECTIONS = 512
# xterm.js writes its own <style> elements, hence 'unsafe-inline' for styles only.
STATIC_CSP = ("default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
              "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
                ".ico": "image/x-icon", ".json": "application/json",
                ".txt": "text/plain; charset=utf-8"}


# -- requests and the route table ----------------------------------------------

_JSON_KINDS = {str: "string", list: "list", int: "number", float: "number", dict: "object",
               bool: "boolean"}


class Request:
    def __init__(self, handler, params, query, body):
        self.handler, self.params, self.query, self.body = handler, params, query, body

    def arg(self, name, default=None, required=False, kinds=(str,)):
        """A parameter from the query string, else from a JSON body; a JSON value
        must be one of `kinds` (a string unless said otherwise)."""
        if name in self.query:
            return self.query[name][-1]
        if isinstance(self.body, dict) and self.body.get(name) is not None:
            value = self.body[name]
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                names = sorted({_JSON_KINDS[k] for k in kinds})
                raise CaoError(f"parameter {name!r} must be a {' or a '.join(names)}")
            return value
        if required:
            raise CaoError(f"missing required parameter {name!r}")
        return default

    def flag(self, name, default=False):
        value = self.arg(name, default, kinds=(str, bool))
        if isinstance(value, bool):
            return value
        if value.lower() not in ("true", "false", "1", "0"):
            raise CaoError(f"{name} must be true or false")
        return value.lower() in ("true", "1")

    def number(self, name, default, low, high):
        value = self.arg(name, default, kinds=(str, int, float))
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise CaoError(f"{name} must be a number between {low} and {high}")
        if not low <= value <= high:
            raise CaoError(f"{name}={value:g} is out of range; use {low} to {high}")
        return value


ROUTES = []


def route(method, pattern, status=200):
    """Register a handler(app, request); a handler returning None answers {"success": true}."""
    def register(func):
        ROUTES.append((method, re.compile(pattern + r"\Z"), func, status))
        return func
    return register


# -- routes: health ------------------------------------------------------------

@route("GET", r"/health")
def _health(app, req):
    return {"status": "ok", "service": "cli-agent-orchestrator", "version": __version__,
            "terminal_backend": "tmux", "pid": os.getpid()}


# -- routes: sessions ----------------------------------------------------------

@route("GET", r"/sessions")
def _list_sessions(app, req):
    return app.sessions.list()


def _initial_message(req):
    message = req.body.get("initial_message") if isinstance(req.body, dict) else None
    if message is not None:
        check_message(message)
    return message


@route("POST", r"/sessions", 201)
def _create_session(app, req):
    return app.sessions.create(req.arg("agent_profile", required=True), req.arg("provider"),
                               req.arg("session_name"), req.arg("working_directory"),
                               req.arg("allowed_tools", kinds=(str, list)), _initial_message(req),
                               req.arg("model"), req.flag("use_worktree"),
                               req.arg("env_vars", kinds=(dict,)), req.arg("resume_session_id"),
                               _wait_for_room(req))


@route("POST", r"/sessions/resume")
def _resume_all_sessions(app, req):
    return app.resumer.resume_all()


@route("POST", r"/sessions/(?P<name>[^/]+)/resume")
def _resume_session(app, req):
    return app.resumer.resume(req.params["name"])


@route("GET", r"/sessions/(?P<name>[^/]+)")
def _get_session(app, req):
    return app.sessions.get(req.params["name"])


@route("DELETE", r"/sessions/(?P<name>[^/]+)")
def _delete_session(app, req):
    return app.sessions.delete(req.params["name"])


@route("POST", r"/sessions/(?P<name>[^/]+)/terminals", 201)
def _create_terminal(app, req):
    caller = req.arg("caller_id")
    return app.terminals.create(req.params["name"], req.arg("agent_profile", required=True),
                                req.arg("provider"), req.arg("working_directory"),
                                req.arg("allowed_tools", kinds=(str, list)),
                                check_terminal_id(caller) if caller else None,
                                initial_message=_initial_message(req), model=req.arg("model"),
                                description=req.arg("description"),
                                use_worktree=req.flag("use_worktree"),
                                wait_for_room=_wait_for_room(req))


def _wait_for_room(req):
    """wait_for_room=false: beyond the fleet's limits, fail at once (429) instead of waiting."""
    return req.flag("wait_for_room", True)


@route("GET", r"/fleet")
def _fleet(app, req):
    return app.capacity.usage()


@route("GET", r"/sessions/(?P<name>[^/]+)/terminals")
def _session_terminals(app, req):
    return app.sessions.get(req.params["name"])["terminals"]


# -- routes: terminals ---------------------------------------------------------

@route("GET", r"/terminals")
def _all_terminals(app, req):
    return app.terminals.all()


@route("GET", r"/approvals")
def _approvals(app, req):
    return app.terminals.waiting()


@route("GET", r"/terminals/(?P<id>[^/]+)")
def _get_terminal(app, req):
    return app.terminals.get(req.params["id"])


@route("DELETE", r"/terminals/(?P<id>[^/]+)")
def _delete_terminal(app, req):
    app.terminals.delete(req.params["id"])


@route("POST", r"/terminals/(?P<id>[^/]+)/input")
def _terminal_input(app, req):
    app.typist.send(req.params["id"], req.arg("message", required=True))


@route("GET", r"/terminals/(?P<id>[^/]+)/output")
def _terminal_output(app, req):
    mode = req.arg("mode", "full")
    return {"output": app.terminals.output(req.params["id"], mode), "mode": mode}


@route("POST", r"/terminals/(?P<id>[^/]+)/exit")
def _terminal_exit(app, req):
    app.typist.exit(req.params["id"])


@route("POST", r"/terminals/(?P<id>[^/]+)/key")
def _terminal_key(app, req):
    app.typist.send_key(req.params["id"], req.arg("key", required=True))


@route("POST", r"/terminals/(?P<id>[^/]+)/keys")
def _terminal_keys(app, req):
    app.typist.type_keys(req.params["id"], req.arg("data", required=True))


@route("POST", r"/terminals/(?P<id>[^/]+)/signal")
def _terminal_signal(app, req):
    app.tracker.signal(req.params["id"], req.arg("status", required=True))
    conversation = req.arg("conversation_id")
    if conversation is not None:
        app.resumer.learn(req.params["id"], conversation)
    return {"success": True}


@route("POST", r"/terminals/(?P<id>[^/]+)/answer")
def _terminal_answer(app, req):
    return app.typist.answer(req.params["id"], req.arg("answer", required=True))


@route("GET", r"/terminals/(?P<id>[^/]+)/siblings")
def _terminal_siblings(app, req):
    depth = req.arg("depth")
    return app.terminals.siblings(req.params["id"], None if depth is None else
                                  int(req.number("depth", 1, 0, 100)), req.flag("cross_session"))


@route("PATCH", r"/terminals/(?P<id>[^/]+)/description")
def _terminal_description(app, req):
    return app.terminals.set_description(req.params["id"], req.arg("description", required=True))


@route("POST", r"/terminals/run-step")
def _run_step(app, req):
    caller, reuse = req.arg("caller_id"), req.arg("reuse_terminal_id")
    tools = req.arg("allowed_tools", kinds=(str, list))
    return app.handoffs.run_step(
        req.arg("agent", required=True), req.arg("prompt", required=True), req.arg("provider"),
        req.arg("session_name"), check_terminal_id(reuse) if reuse else None,
        req.flag("teardown", True), req.number("timeout", 600, 1, 86400),
        req.arg("working_directory"), check_terminal_id(caller) if caller else None, tools,
        req.arg("model"), req.arg("description"), req.flag("use_worktree"), req.arg("job_id"))


@route("GET", r"/handoff-results/(?P<job_id>[^/]+)")
def _handoff_result(app, req):
    return app.handoffs.result(req.params["job_id"])


@route("GET", r"/terminals/(?P<id>[^/]+)/screen")
def _terminal_screen(app, req):
    return app.terminals.screen(req.params["id"], req.arg("etag"), req.number("wait", 0, 0, 60))


@route("GET", r"/screens")
def _screens(app, req):
    wanted = req.query.get("terminal", [])
    if not wanted or len(wanted) > MAX_SCREENS:
        raise CaoError(f"name 1 to {MAX_SCREENS} terminals as ?terminal=ID or ?terminal=ID:ETAG")
    etags = {}
    for item in wanted:
        tid, _, etag = item.partition(":")
        etags[check_terminal_id(tid)] = etag or None
    return {"screens": app.terminals.screens(etags, req.number("wait", 0, 0, 60))}


@route("GET", r"/terminals/(?P<id>[^/]+)/working-directory")
def _terminal_workdir(app, req):
    return {"working_directory": app.terminals.working_directory(req.params["id"])}


# -- routes: inbox -------------------------------------------------------------

@route("POST", r"/terminals/(?P<id>[^/]+)/inbox/messages")
def _post_message(app, req):
    return app.inbox.post(req.arg("sender_id", required=True), req.params["id"],
                         req.arg("message", required=True))


@route("GET", r"/terminals/(?P<id>[^/]+)/inbox/messages")
def _list_messages(app, req):
    return app.inbox.messages(req.params["id"], req.number("limit", 10, 1, 100), req.arg("status"))


# -- routes: memory ------------------------------------------------------------

def _memory(app):
    if not memory_enabled():
        raise Conflict("memory is off (settings.json memory.enabled is false); turn it on to use it")
    return app.memory


def _memory_terminal(app, req):
    context = req.arg("terminal_context", required=True, kinds=(dict,))
    return app.terminals.row(context.get("terminal_id"))


@route("POST", r"/internal/memory/store")
def _memory_store(app, req):
    memory, action = _memory(app).put(
        _memory_terminal(app, req), req.arg("content", required=True),
        req.arg("scope", "project"), req.arg("memory_type", "project"), req.arg("key"),
        req.arg("tags", kinds=(str, list)))
    return {"memory": memory, "action": action}


@route("POST", r"/internal/memory/recall")
def _memory_recall(app, req):
    return {"memories": _memory(app).recall(
        _memory_terminal(app, req), req.arg("query"), req.arg("scope"), req.arg("memory_type"),
        req.number("limit", 10, 1, 500), req.arg("search_mode", "hybrid"), req.arg("sort_by"),
        req.flag("include_related"))}


@route("POST", r"/internal/memory/forget")
def _memory_forget(app, req):
    return _memory(app).forget(_memory_terminal(app, req), req.arg("key", required=True),
                               req.arg("scope", "project"))


@route("POST", r"/internal/memory/context")
def _memory_context_for(app, req):
    return {"context": _memory(app).context(_memory_terminal(app, req), req.arg("message", ""))}


@route("GET", r"/memory")
def _memory_list(app, req):
    return _memory(app).listing(req.arg("scope"), req.arg("type"), req.arg("scope_id"),
                                req.number("limit", 100, 1, 500))


@route("DELETE", r"/memory")
def _memory_clear(app, req):
    return _memory(app).clear(req.arg("scope", required=True), req.arg("scope_id"))


@route("GET", r"/memory/(?P<key>[^/]+)")
def _memory_get(app, req):
    return _memory(app).get(req.params["key"], req.arg("scope"), req.arg("scope_id"))


@route("DELETE", r"/memory/(?P<key>[^/]+)")
def _memory_delete(app, req):
    return _memory(app).delete(req.params["key"], req.arg("scope"), req.arg("scope_id"))


@route("GET", r"/terminals/(?P<id>[^/]+)/memory-context")
def _terminal_memory_context(app, req):
    row = app.terminals.row(req.params["id"])
    return {"terminal_id": row["id"], "injected": bool(row["memory_context"]),
            "context": row["memory_context"] or ""}


@route("GET", r"/settings/memory")
def _memory_settings_route(app, req):
    return {"enabled": memory_enabled(), "learning_enabled": False}


# -- routes: flows -------------------------------------------------------------

@route("GET", r"/flows")
def _flows(app, req):
    return app.flows.listing()


@route("POST", r"/flows", 201)
def _add_flow(app, req):
    if not isinstance(req.body, dict):
        raise CaoError("send the flow as a JSON object: name, schedule, agent_profile, "
                       "prompt_template, and optionally provider and script")
    fields = {k: req.arg(k) for k in FLOW_FIELDS + ("prompt_template",)}
    return app.flows.add(fields)


@route("GET", r"/flows/(?P<name>[^/]+)")
def _flow(app, req):
    return app.flows.get(req.params["name"])


@route("DELETE", r"/flows/(?P<name>[^/]+)")
def _remove_flow(app, req):
    return app.flows.remove(req.params["name"])


@route("POST", r"/flows/(?P<name>[^/]+)/(?P<switch>enable|disable)")
def _switch_flow(app, req):
    return app.flows.enable(req.params["name"], req.params["switch"] == "enable")


@route("POST", r"/flows/(?P<name>[^/]+)/run")
def _run_flow(app, req):
    return app.flows.run_flow(app.flows.get(req.params["name"])["name"])


# -- routes: plugins -----------------------------------------------------------

@route("GET", r"/plugins")
def _plugins(app, req):
    return app.plugins.listing()


# -- routes: skills ------------------------------------------------------------

@route("GET", r"/skills")
def _skills(app, req):
    return app.skills.listing()


@route("GET", r"/skills/(?P<name>[^/]+)")
def _skill(app, req):
    return app.skills.get(req.params["name"])


@route("GET", r"/settings/skill-dirs")
def _skill_dirs(app, req):
    return {"skills_dir": str(app.skills.root), "extra_dirs": [str(d) for d in skill_dirs()]}


@route("POST", r"/settings/skill-dirs")
def _set_skill_dirs(app, req):
    dirs = req.arg("extra_dirs", required=True, kinds=(list,))
    for d in dirs:
        if not isinstance(d, str) or not Path(d).expanduser().is_dir():
            raise CaoError(f"extra skill folder {d!r} is not a folder; pass existing folder paths")
        if within(Path(d).expanduser(), cao_home()):
            raise CaoError(f"{d} is inside cao's home; skills there go in {app.skills.root}")
    settings = dict(load_settings())
    settings["skills"] = {**(settings.get("skills") if isinstance(settings.get("skills"), dict)
                             else {}), "extra_dirs": [str(Path(d).expanduser().resolve()) for d in dirs]}
    write_inside(cao_home() / "settings.json", cao_home(), json.dumps(settings, indent=2) + "\n")
    return _skill_dirs(app, req)


# -- routes: agents ------------------------------------------------------------

@route("GET", r"/agents/profiles")
def _profiles(app, req):
    return list_profiles()


@route("POST", r"/agents/profiles/install")
def _install_profile(app, req):
    """Over HTTP only a profile name or an https URL: never a path on this machine."""
    source = req.arg("source", required=True)
    if not source.startswith("https://") and not PROFILE_NAME_RE.fullmatch(source):
        raise CaoError(f"source {source!r} must be a profile name or an https:// URL; "
                       "install a file with `cao install PATH` on the server's machine")
    provider = req.arg("provider")
    if provider is not None:
        get_provider(provider)
    env_vars = check_env_vars(req.arg("env_vars", kinds=(dict,)))
    if env_vars:
        save_env_file(env_vars)
    info = install_profile(source)
    return {"success": True, "message": f"Agent '{info['name']}' installed", "agent_name": info["name"],
            "agent_file": info["path"], "context_file": info["path"], "provider": provider,
            "unresolved_vars": [v for v in info["unresolved_vars"] if v not in env_vars],
            "source_kind": "url" if source.startswith("https://") else "name"}


@route("GET", r"/agents/profiles/(?P<name>[^/]+)")
def _profile(app, req):
    return load_profile(req.params["name"])


@route("GET", r"/agents/providers")
def _providers(app, req):
    return [{"name": name, "binary": provider_binary(spec) or "(built in)",
             "installed": provider_installed(spec), "description": spec.get("description", "")}
            for name, spec in sorted(providers().items())]


# -- routes: events ------------------------------------------------------------

@route("GET", r"/events")
def _events(app, req):
    after = req.arg("after")
    after = app.store.last_event_seq() if after is None else int(req.number("after", 0, 0, 2**62))
    wait = req.number("wait", 0, 0, 60)
    events = app.store.events_after(after, wait)
    return {"events": events, "next": events[-1]["seq"] if events else after}


# -- who may talk to the server ------------------------------------------------
# The server listens on loopback, answers only loopback names in Host (so a DNS
# rebinding page cannot reach it) and refuses state-changing requests whose
# Origin is another site. docs/security.md states the rules and their tests.

_HOST_RE = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::([0-9]{1,5}))?")
_ORIGIN_RE = re.compile(r"https?://(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(:[0-9]{1,5})?")


def _env_list(name, valid, example):
    entries = [e.strip().lower() for e in os.environ.get(name, "").split(",") if e.strip()]
    for entry in entries:
        if not valid(entry):
            raise ConfigError(f"{name}: {entry!r} is not valid; list entries like {example}, "
                              "separated by commas")
    return entries


def allowed_hosts():
    """Names accepted in the Host header: loopback plus CAO_ALLOWED_HOSTS."""
    return frozenset(LOOPBACK_HOSTS + tuple(_env_list("CAO_ALLOWED_HOSTS", HOSTNAME_RE.fullmatch,
                                                      "myhost.internal")))


def allowed_origins():
    """Other origins allowed to change state: CAO_CORS_ORIGINS ('*' allows any page)."""
    return frozenset(_env_list("CAO_CORS_ORIGINS", lambda o: o == "*" or _ORIGIN_RE.fullmatch(o),
                               "http://localhost:3000"))


def host_allowed(value, hosts):
    match = _HOST_RE.fullmatch(value.strip().lower())
    return bool(match) and match[1] in hosts and (match[2] is None or int(match[2]) < 65536)


def origin_allowed(origin, host, origins):
    origin, host = origin.strip().lower(), host.strip().lower()
    return origin in (f"http://{host}", f"https://{host}") or origin in origins or "*" in origins


# -- connections ---------------------------------------------------------------

class Refused(CaoError):
    """A request the server will not act on, with its HTTP status."""

    def __init__(self, status, detail):
        super().__init__(detail)
        self.status = status


class _Connections:
    """Open connections by client address. Past a cap, the connection that has
    waited longest for its next request makes room, so clients that hold sockets
    open cannot lock others out; when every one is busy, the newcomer is refused."""

    def __init__(self, per_client, total):
        self.per_client, self.total = per_client, total
        self.lock = threading.Lock()
        self.open = {}  # socket -> [client address, waiting for a request]; oldest first

    def admit(self, sock, client):
        with self.lock:
            for limit, same_client in ((self.per_client, True), (self.total, False)):
                peers = [s for s, (c, _) in self.open.items() if c == client or not same_client]
                if len(peers) >= limit and not self._evict(peers):
                    return False
            self.open[sock] = [client, True]
            return True

    def _evict(self, peers):
        for sock in peers:
            if self.open[sock][1]:
                del self.open[sock]
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # its thread's read returns at once
                except OSError:
                    pass
                return True
        return False

    def waiting(self, sock, flag):
        with self.lock:
            entry = self.open.get(sock)
            if entry:
                entry[1] = flag

    def close(self, sock):
        with self.lock:
            self.open.pop(sock, None)


class _RequestReader(io.RawIOBase):
    """The socket as a handler reads it: every read waits only until the handler's
    deadline, so a client that sends slowly, or nothing, is dropped in time."""

    def __init__(self, handler):
        self.handler = handler

    def readable(self):
        return True

    def readinto(self, buffer):
        handler, sock = self.handler, self.handler.connection
        remaining = handler.read_deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the client did not send its request in time")
        sock.settimeout(remaining)
        try:
            count = sock.recv_into(buffer)
        finally:
            sock.settimeout(HTTP_WRITE_TIMEOUT)
        if count and handler.idle:  # the next request has begun: it gets the request timeout
            handler.idle = False
            handler.read_deadline = time.monotonic() + handler.server.request_timeout
        return count


# -- the handler ---------------------------------------------------------------

_ERROR_HINTS = {400: "send a well-formed HTTP/1.1 request",
                414: "the request line is over 64 KiB; send parameters in a JSON body",
                431: "send fewer or shorter headers (at most 100, 64 KiB each)",
                501: "cao-server answers GET, HEAD, POST, PUT, PATCH and DELETE",
                505: "send HTTP/1.1"}


class ApiHandler:
    """One connection. Every answer either follows a fully read request or closes
    the connection: bytes the server did not read as a body are never read as the
    next request. make_server mixes it into http.server's handler, which only the
    server imports."""

    protocol_version = "HTTP/1.1"
    server_version = "cao/" + __version__
    # Headers and body go out in two writes; without TCP_NODELAY the body waits
    # ~40 ms for the client's delayed ACK on a keep-alive connection.
    disable_nagle_algorithm = True
    app = None  # set by make_server
    body_unread = False

    def setup(self):
        super().setup()
        self.rfile.close()
        self.rfile = io.BufferedReader(_RequestReader(self))
        self.connection.settimeout(HTTP_WRITE_TIMEOUT)
        self.read_deadline = time.monotonic() + self.server.request_timeout
        self.idle, self.served = False, 0

    def handle(self):
        try:
            super().handle()
        except OSError:  # the client went away, or was dropped for room; nothing to answer
            self.close_connection = True

    def handle_one_request(self):
        if self.served:
            self.idle, self.read_deadline = True, time.monotonic() + HTTP_IDLE_TIMEOUT
        self.served += 1
        self.body_unread = False
        self.server.connections.waiting(self.connection, True)
        super().handle_one_request()

    def parse_request(self):
        parsed = super().parse_request()
        if parsed:
            self.server.connections.waiting(self.connection, False)
        return parsed

    def handle_expect_100(self):
        return True  # 100 Continue goes out only once the request passed every check

    def log_message(self, fmt, *args):
        pass  # the access log would repeat every poll; errors are logged in _dispatch

    def send_error(self, code, message=None, explain=None):
        """The standard library's own refusals (bad request line, 414, 431, 501, 505), as JSON."""
        self.close_connection = True
        detail = message or http.HTTPStatus(code).phrase
        hint = _ERROR_HINTS.get(code)
        self._send(code, {"detail": f"{detail}; {hint}" if hint else detail})

    def _send(self, status, payload, content_type="application/json", headers=None):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        if self.body_unread:  # the bytes after this request are its body, not a request
            self.close_connection = True
        if self.request_version == "HTTP/0.9":  # 0.9 has no status line; nobody could read why
            self.request_version = "HTTP/1.0"
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {"Cache-Control": "no-store"}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _check_framing(self):
        if self.headers.get_all("Transfer-Encoding"):
            self.body_unread = True
            raise Refused(501, "Transfer-Encoding is not supported; send the body with a Content-Length")
        lengths = self.headers.get_all("Content-Length") or []
        if len(lengths) > 1 or (lengths and not re.fullmatch(r"[0-9]{1,16}", lengths[0].strip())):
            self.body_unread = True
            raise Refused(400, "a request needs at most one Content-Length header, holding a number")
        self.body_length = int(lengths[0]) if lengths else 0
        self.body_unread = self.body_length > 0
        if self.body_length > MAX_BODY:
            raise Refused(413, f"request body is over {MAX_BODY} bytes; send less")
        if self.body_unread and self.command in ("GET", "HEAD"):
            raise Refused(400, f"a {self.command} request takes no body; put parameters in the query")

    def _check_request(self):
        if self.request_version not in ("HTTP/1.0", "HTTP/1.1"):
            raise Refused(505, f"{self.request_version} is not supported; send HTTP/1.1")
        self._check_framing()
        hosts = self.headers.get_all("Host") or []
        if len(hosts) != 1 or not host_allowed(hosts[0], self.server.hosts):
            raise Refused(400, "Invalid host header; cao-server answers one Host header naming "
                               "localhost, 127.0.0.1 or [::1] with an optional port (set "
                               "CAO_ALLOWED_HOSTS to add a name)")
        if not self.path.startswith("/"):
            raise Refused(400, "the request target must be a path starting with /")
        origins = self.headers.get_all("Origin") or []
        if self.command not in ("GET", "HEAD") and origins and (
                len(origins) > 1 or not origin_allowed(origins[0], hosts[0], self.server.origins)):
            raise Refused(403, "Cross-origin request blocked")

    def _read_body(self):
        if not self.body_unread:
            return {}
        if self.headers.get_content_type() != "application/json":
            raise Refused(415, "a request body must be JSON, sent with Content-Type: application/json")
        if self.headers.get("Expect", "").lower() == "100-continue" and \
                self.request_version == "HTTP/1.1":
            self.send_response_only(100)
            self.end_headers()
        raw = self.rfile.read(self.body_length)
        if len(raw) < self.body_length:
            raise ConnectionAbortedError("the client closed the connection inside the body")
        self.body_unread = False
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            raise CaoError("request body is not valid JSON")

    def _dispatch(self):
        try:
            self._check_request()
            url = urllib.parse.urlsplit(self.path)
            path = urllib.parse.unquote(url.path)
            allowed = []
            for method, pattern, func, status in ROUTES:
                match = pattern.match(path)
                if not match:
                    continue
                if method != self.command and not (method == "GET" and self.command == "HEAD"):
                    allowed.append(method)
                    continue
                query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
                body = self._read_body()
                result = func(self.app, Request(self, match.groupdict(), query, body))
                return self._send(status, {"success": True} if result is None else result)
            if allowed:
                raise Refused(405, f"method {self.command} not allowed here; "
                                   f"use {', '.join(sorted(set(allowed)))}")
            static = STATIC.get(path) if self.command in ("GET", "HEAD") else None
            if not static:
                raise Refused(404, f"no such endpoint: {self.command} {url.path}")
            return self._send(*static.answer(self.headers))
        except Refused as e:
            self.close_connection = True  # a refused client gets no second request
            return self._send(e.status, {"detail": str(e)})
        except CaoError as e:
            return self._send(e.status, {"detail": getattr(e, "detail", None) or str(e)})
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as e:  # a bug, not bad input: say so and keep serving
            traceback.print_exc()
            return self._send(500, {"detail": f"internal error: {type(e).__name__}: {e}"})

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = do_HEAD = _dispatch


class StaticFile:
    """One file of web_static/ as browsers get it: an ETag to revalidate, gzip when
    asked for, and a year of caching for vendor files, whose names carry their version."""

    COMPRESSIBLE = ("text/", "application/json", "image/svg")

    def __init__(self, rel, data):
        import gzip
        import hashlib
        self.data, self.etag = data, '"%s"' % hashlib.sha1(data).hexdigest()[:20]
        self.type = STATIC_TYPES.get(os.path.splitext(rel)[1].lower(), "application/octet-stream")
        self.gzipped = gzip.compress(data, 9, mtime=0) \
            if self.type.startswith(self.COMPRESSIBLE) and len(data) > 1024 else None
        self.headers = {"ETag": self.etag, "Vary": "Accept-Encoding",
                        "Cache-Control": "public, max-age=31536000, immutable"
                        if rel.startswith("vendor/") else "no-cache",
                        "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                        "Content-Security-Policy": STATIC_CSP}

    def answer(self, request_headers):
        """(status, body, content type, headers) for a request with these headers."""
        if self.etag in [t.strip() for t in request_headers.get("If-None-Match", "").split(",")]:
            return 304, b"", None, self.headers
        accepts = request_headers.get("Accept-Encoding", "")
        if self.gzipped and re.search(r"\bgzip\b(?!;q=0(\.0*)?\b)", accepts):
            return 200, self.gzipped, self.type, {**self.headers, "Content-Encoding": "gzip"}
        return 200, self.data, self.type, self.headers


class StaticFiles:
    """web_static/ by URL path: only plain names, in the folder or its vendor/."""

    NAME_RE = re.compile(r"(?:vendor/)?[A-Za-z0-9_-]+(?:\.[A-Za-z0-9]+)+")

    def __init__(self):
        self.files, self.lock = {}, threading.Lock()

    def get(self, path):
        rel = "index.html" if path in ("/", "") else path.lstrip("/")
        if rel.startswith("static/"):
            rel = rel[len("static/"):]
        if not self.NAME_RE.fullmatch(rel):
            return None
        data = read_resource("web_static/" + rel)
        if data is None:
            return None
        with self.lock:  # a file edited in a checkout is served anew
            cached = self.files.get(rel)
            if cached is None or cached.data != data:
                cached = self.files[rel] = StaticFile(rel, data)
        return cached


STATIC = StaticFiles()


# -- the server ----------------------------------------------------------------

class ApiServer:
    """Mixed into http.server's ThreadingHTTPServer by make_server."""
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, handler, request_timeout=HTTP_REQUEST_TIMEOUT):
        self.hosts, self.origins = allowed_hosts(), allowed_origins()
        self.request_timeout = request_timeout
        self.connections = _Connections(MAX_CONNECTIONS_PER_CLIENT, MAX_CONNECTIONS)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if self.connections.admit(request, client_address[0]):
            return super().process_request(request, client_address)
        body = json.dumps({"detail": f"too many open connections from {client_address[0]}; "
                                     "close some and retry"}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        try:
            request.setblocking(False)  # never let one refusal stall the accept loop
            request.send(head + body)
        except OSError:
            pass
        self.shutdown_request(request)

    def shutdown_request(self, request):
        self.connections.close(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], OSError):
            return  # a client that went away is not the server's error
        print(f"cao-server: error while serving {client_address[0]}:", file=sys.stderr)
        traceback.print_exc()


def _request_timeout():
    value = os.environ.get("CAO_HTTP_REQUEST_TIMEOUT") or str(HTTP_REQUEST_TIMEOUT)
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 3600:
        raise ConfigError(f"CAO_HTTP_REQUEST_TIMEOUT={value!r} is not a number of seconds; "
                          "set it to more than 0 and at most 3600")
    return seconds


def make_server(host, port):
    """A started App behind an HTTP server bound to a loopback address."""
    if host == "localhost":
        host = "127.0.0.1"
    try:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError
    except ValueError:
        raise ConfigError(f"cao-server listens on loopback only; use --host 127.0.0.1 or ::1, not {host}")
    timeout = _request_timeout()
    allowed_hosts(), allowed_origins()  # a bad entry stops the server before it listens
    home = ensure_home()
    store = Store(home / "db" / "cao.db")
    import http.server  # here, not at the top: a CLI command never serves
    server_class = type("ApiServer", (ApiServer, http.server.ThreadingHTTPServer),
                        {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
    handler = type("Handler", (ApiHandler, http.server.BaseHTTPRequestHandler), {})
    try:
        server = server_class((host, port), handler, timeout)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}; "
                          "is another cao-server running? pick another --port")
    app = App(store, host, server.server_address[1])
    app.start()
    server.RequestHandlerClass = type("Handler", (handler,), {"app": app})
    server.app = app
    return server


def serve(host, port):
    server = make_server(host, port)
    pid_file = cao_home() / "server.json"
    write_inside(pid_file, cao_home(), json.dumps({
        "pid": os.getpid(), "host": host, "port": server.server_address[1],
        "autostarted": os.environ.get("CAO_AUTOSTARTED") == "1"}))
    def stop(signum, _frame):
        print(f"cao-server stopping on {signal.Signals(signum).name}", flush=True)
        threading.Thread(target=server.shutdown).start()
    signal.signal(signal.SIGTERM, stop)
    print(f"cao-server {__version__} listening on http://{host}:{server.server_address[1]} "
          f"(home {cao_home()})", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.app.stop()
        try:
            if json.loads(read_inside(pid_file, cao_home())).get("pid") == os.getpid():
                pid_file.unlink()
        except (OSError, ValueError, CaoError):
            pass
    return 0


###############################################################################
# MCP servers #################################################################
###############################################################################

# `cao mcp` runs inside each agent CLI as its stdio MCP server and serves
# AGENT_TOOLS. It knows its caller by CAO_TERMINAL_ID.

def _as_mcp_tool(func, flagged):
    """func for the MCP SDK: a CaoError becomes {"success": false, "error": ...},
    and a parameter whose flag is off is not offered to the model."""
    import functools
    import inspect
    import typing
    hidden = {name for name, flag in flagged.items() if not _flag(flag, "false")}
    signature = inspect.signature(func)

    @functools.wraps(func)
    def tool(**arguments):
        try:
            return func(**arguments)
        except CaoError as e:
            return {"success": False, "error": str(e)}
    returns = signature.return_annotation
    tool.__signature__ = signature.replace(parameters=[
        p for name, p in signature.parameters.items() if name not in hidden],
        # a dict result is also sent as structured content, which wants its value types
        return_annotation=dict[str, typing.Any] if returns is dict else returns)
    return tool


def _returns_dict(func):
    import inspect
    return inspect.signature(func).return_annotation is dict


def run_mcp_server(table=AGENT_TOOLS, name=CAO_MCP_NAME,
                   purpose="Tools to delegate work to other agents of this cao session"):
    import_optional("mcp", f"`{name}`")
    try:
        from mcp.server.mcpserver import MCPServer
    except ImportError:  # mcp < 2 calls it FastMCP
        from mcp.server.fastmcp import FastMCP as MCPServer
    summaries = ", ".join(f"{func.__name__} ({summary})" for func, summary, _ in table)
    server = MCPServer(name, instructions=f"{purpose}: {summaries}.")
    Client.patience = SERVER_RESTART_WAIT  # a tool call outlasts a server restart
    for func, _, flagged in table:
        # A dict result is structured content too; a text result (a skill) stays text.
        server.tool(structured_output=_returns_dict(func))(_as_mcp_tool(func, flagged))
    terminal_id = os.environ.get("CAO_TERMINAL_ID")
    if table is AGENT_TOOLS and terminal_id:  # its agent's first input waits for this
        threading.Thread(target=_say_mcp_ready, args=(terminal_id,), daemon=True).start()
    try:
        server.run()
    except Exception as e:
        if not _agent_hung_up(e):
            raise
    return 0


def _say_mcp_ready(terminal_id):
    try:
        Client().signal(terminal_id, "mcp_ready")
    except CaoError:
        pass  # an older server, or none: the first input only waits longer


def _agent_hung_up(error):
    """True for an error, or a group of them, that only says the agent closed our
    pipes (it exited, or died with its tmux): nothing is wrong with the server."""
    inner = getattr(error, "exceptions", None)
    if inner is not None:
        return all(_agent_hung_up(e) for e in inner)
    return isinstance(error, (BrokenPipeError, ConnectionResetError))


###############################################################################
# Demo agent ##################################################################
###############################################################################

DEMO_PROMPT = "> "


class _DemoInput:
    """Reads one submitted input from a raw tty, understanding bracketed paste, so a
    pasted multi-line message stays one input until Enter, as in real agent CLIs."""

    def __init__(self, fd):
        self.fd, self.pending = fd, b""

    PASTE_MARKS = (b"\x1b[200~", b"\x1b[201~")

    def _next_chunk(self):
        """Pending bytes plus fresh reads, never ending inside a paste marker (a
        marker split across two reads would otherwise leave the paste open)."""
        data = self.pending
        while not data or self._ends_mid_marker(data):
            chunk = os.read(self.fd, 4096)
            if not chunk:
                return None
            data += chunk
        return data

    def _ends_mid_marker(self, data):
        tail = data[-5:]
        partial = tail[tail.rfind(b"\x1b"):] if b"\x1b" in tail else b""
        return any(m.startswith(partial) and m != partial for m in self.PASTE_MARKS) if partial else False

    def key(self):
        """One keypress (for a y/n question)."""
        if not self.pending:
            self.pending = os.read(self.fd, 64)
        key, self.pending = self.pending[:1], self.pending[1:]
        return key.decode(errors="replace")

    def read(self):
        buf, in_paste = [], False
        while True:
            data = self._next_chunk()
            if data is None:
                return None
            self.pending = b""
            i = 0
            while i < len(data):
                if data.startswith(b"\x1b[200~", i):
                    in_paste, i = True, i + 6
                elif data.startswith(b"\x1b[201~", i):
                    in_paste, i = False, i + 6
                elif data[i:i + 1] in (b"\r", b"\n") and not in_paste:
                    self.pending = data[i + 1:]
                    sys.stdout.write("\r\n")
                    return b"".join(buf).decode(errors="replace")
                elif data[i:i + 1] == b"\x04" and not buf:
                    return None
                elif data[i:i + 1] == b"\x03":
                    buf = []
                    sys.stdout.write("^C\r\n" + DEMO_PROMPT)
                    i += 1
                elif data[i:i + 1] in (b"\x7f", b"\x08"):
                    if buf:
                        buf.pop()
                        sys.stdout.write("\b \b")
                    i += 1
                else:
                    ch = data[i:i + 1]
                    ch = b"\n" if ch == b"\r" else ch
                    buf.append(ch)
                    sys.stdout.write("\u21b5" if ch == b"\n" else ch.decode(errors="replace"))
                    i += 1
            sys.stdout.flush()


def _demo_call_tool(name, arguments):
    """Call one tool of `cao mcp` through the MCP SDK's stdio client, as an agent would."""
    import_optional("mcp", "the demo agent's orchestration commands")
    import asyncio
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    async def call():
        params = StdioServerParameters(command=self_command()[0],
                                       args=self_command()[1:] + ["mcp"], env=dict(os.environ))
        # The server's stderr must not scribble on this agent's screen.
        with open_log("mcp.log", text=True) as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    result = await session.call_tool(name, arguments)
                    structured = getattr(result, "structured_content",  # mcp >= 2
                                         getattr(result, "structuredContent", None))
                    if isinstance(structured, dict):
                        return structured
                    text = "".join(getattr(part, "text", "") for part in result.content)
                    try:
                        return json.loads(text)
                    except ValueError:
                        return text
    return asyncio.run(call())


def _demo_tool(rest):
    """/tool NAME {json}: call any cao MCP tool and show its result as one JSON line."""
    name, _, raw = rest.partition(" ")
    try:
        arguments = json.loads(raw) if raw.strip() else {}
    except ValueError as e:
        return f"error: the arguments of /tool {name} are not JSON ({e})"
    if not isinstance(arguments, dict):
        return "error: /tool arguments must be a JSON object, such as {\"query\": \"tests\"}"
    return json.dumps(_demo_call_tool(name, arguments), separators=(",", ":"))


def _demo_command(first):
    """Run /handoff PROFILE TEXT, /assign PROFILE TEXT, /send ID|- TEXT or
    /tool NAME {json}; None if not one."""
    if first.startswith("/tool "):
        try:
            return _demo_tool(first[6:].strip())
        except Exception as e:  # the demo reports any failure on screen, like an agent would
            return f"error: {type(e).__name__}: {e}"
    parts = first.split(None, 2)
    if len(parts) < 3 or parts[0] not in ("/handoff", "/assign", "/send"):
        return None
    command, target, text = parts
    try:
        if command == "/handoff":
            result = _demo_call_tool("handoff", {"agent_profile": target, "message": text})
            return result.get("output") if result.get("success") else \
                f"error: {result.get('message') or result.get('error')}"
        if command == "/assign":
            result = _demo_call_tool("assign", {"agent_profile": target, "message": text})
            return f"assigned {result['terminal_id']}" if result.get("success") else \
                f"error: {result.get('error')}"
        args = {"message": text} if target == "-" else {"message": text, "receiver_id": target}
        result = _demo_call_tool("send_message", args)
        return None if result.get("success") else f"error: {result.get('error')}"
    except Exception as e:  # the demo reports any failure on screen, like an agent would
        return f"error: {type(e).__name__}: {e}"


def demo_answer(text):
    """The demo agent's reply to one input (only its first line counts, after any
    <cao-memory> block)."""
    text = re.sub(r"\A\s*<cao-memory>.*?</cao-memory>", "", text, flags=re.S)
    first = (text.strip().split("\n") or [""])[0].strip()
    return f"done: {_demo_command(first) or first}"


def _demo_audit(path, text, reader):
    """Append one JSON line per input to CAO_DEMO_LOG, noting whether more input
    arrived while this one was being answered (which cao must never cause)."""
    busy_input = bool(reader.pending) or bool(select.select([reader.fd], [], [], 0)[0])
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"terminal_id": os.environ.get("CAO_TERMINAL_ID"), "input": text,
                            "busy_input": busy_input, "t": time.time()}) + "\n")


class DemoConversation:
    """The demo agent's turns, one JSON line each, kept under its id as real CLIs keep
    theirs, so `--resume ID` continues it: the old turns are drawn again and /history
    lists them."""

    def __init__(self, conversation_id):
        self.path = None
        if conversation_id:
            check_conversation_id(conversation_id)
            folder = Path(os.environ.get("CAO_HOME_DIR") or cao_home()) / "demo-conversations"
            folder.mkdir(parents=True, exist_ok=True)
            self.path = folder / f"{conversation_id}.jsonl"

    def turns(self):
        if not self.path or not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def add(self, text, answer):
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"input": text, "answer": answer}) + "\n")

    def history(self):
        inputs = [(t["input"].strip().split("\n") or [""])[0] for t in self.turns()]
        return f"done: history ({len(inputs)}): " + " | ".join(inputs)


def run_demo_agent(profile, session_id=None, resume=None):
    import termios
    import tty
    delay = float(os.environ.get("CAO_DEMO_DELAY", "0.3") or 0)
    audit = os.environ.get("CAO_DEMO_LOG")
    conversation = DemoConversation(resume or session_id)
    if resume and not conversation.path.exists():  # as Claude Code does
        print(f"No conversation found with session ID: {resume}", file=sys.stderr)
        return 1
    if session_id:  # saved from the start, so even a conversation with no turns resumes
        conversation.path.touch()
    interactive = os.isatty(0)
    saved = termios.tcgetattr(0) if interactive else None
    out = sys.stdout
    if interactive:
        tty.setcbreak(0)
        out.write("\x1b[?2004h")
    reader = _DemoInput(0)
    time.sleep(float(os.environ.get("CAO_DEMO_START_DELAY", "0") or 0))  # a CLI slow to load
    out.write(f"cao demo agent (profile: {profile}). Type a message; Ctrl-D exits.\r\n")
    if resume:
        turns = conversation.turns()
        out.write(f"resumed conversation {resume} ({len(turns)} earlier turns)\r\n")
        for turn in turns[-10:]:
            out.write(DEMO_PROMPT + turn["input"].replace("\n", "\u21b5") + "\r\n"
                      + turn["answer"].replace("\n", "\r\n") + "\r\n")
    try:
        while True:
            out.write(DEMO_PROMPT)
            out.flush()
            text = reader.read() if interactive else sys.stdin.readline() or None
            if text is None:
                break
            if not text.strip():
                continue
            started = time.monotonic()
            spin = 0
            while True:  # the busy line stays up while the answer (maybe a handoff) is made
                out.write("\r" + "|/-\\"[spin % 4] + " working...")
                out.flush()
                spin += 1
                left = delay - (time.monotonic() - started)
                if left <= 0:
                    break
                time.sleep(min(0.1, left))
            question = re.search(r"(?m)^\s*/ask (.+)", text)
            if question:  # a question for the user, as real CLIs ask before risky steps
                out.write(f"\r\x1b[K? {question.group(1).strip()} [y/n] ")
                out.flush()
                key = reader.key() if interactive else (sys.stdin.readline() or "n")[:1]
                out.write(key + "\r\n")
                answer = f"done: answered {key}"
            elif text.strip() == "/history":
                answer = conversation.history()
            else:
                answer = demo_answer(text)
            conversation.add(text, answer)
            if audit:
                _demo_audit(audit, text, reader)
            out.write("\r\x1b[K" + answer.replace("\n", "\r\n") + "\r\n")
    except KeyboardInterrupt:
        pass
    finally:
        if interactive:
            out.write("\x1b[?2004l")
            out.flush()
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
    return 0


###############################################################################
# CLI #########################################################################
###############################################################################

# Each command is a function registered with @command, its options beside it;
# build_parser() turns the table into argparse. "session send" is the command
# `send` in the group `session`.

COMMANDS = []  # [(name, help, options, function)]
COMMAND_GROUPS = {"session": "list, inspect and message sessions", "terminal": "terminal tools",
                  "memory": "what agents stored with memory_store: list, show, delete",
                  "skills": "guides agents load on demand: list, add, remove",
                  "flow": "scheduled agent sessions: add, list, run, remove, enable, disable",
                  "schedule": "the same as `cao flow` (upstream's name)"}


def option(*names, **kwargs):
    return names, kwargs


def one_of(*options):
    """Options of which exactly one must be given."""
    return None, options


def command(name, help, *options):
    def register(func):
        COMMANDS.append((name, help, options, func))
        return func
    return register


def _positive(value):
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number of seconds")
    return number


def _port(value):
    if not re.fullmatch(r"[0-9]{1,5}", value) or not 0 < int(value) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port; use 1-65535")
    return int(value)


def _text(value):
    """An option's value: empty (often an unset shell variable) is a mistake, never a default."""
    if not value.strip():
        raise argparse.ArgumentTypeError("empty value (an unset shell variable?); give a value "
                                         "or leave the option out")
    return value


TIMEOUT = option("--timeout", type=_positive, default=300, help="seconds to wait (default 300)")
TERMINAL = option("--terminal", help="a terminal id instead of the conductor")
JSON_OUT = option("--json", action="store_true")


# -- helpers shared by commands -------------------------------------------------

def _server_log():
    return ensure_home() / "logs" / "server.log"


def ensure_server(client):
    """Return True if a server answers; otherwise start one in the background."""
    try:
        client.health(timeout=5)
        return False
    except ServerUnavailable:
        pass
    log = open_log("server.log")
    proc = subprocess.Popen(self_command() + ["server", "--host", client.host,
                                              "--port", str(client.port)],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "CAO_AUTOSTARTED": "1"})
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = _server_log().read_text(errors="replace").strip().splitlines()[-1:]
            raise ServerUnavailable(f"cao-server failed to start: {' '.join(tail) or 'no output'}")
        try:
            client.health(timeout=2)
            print(f"cao-server was not running; started it in the background (pid {proc.pid}, "
                  f"http://{client.host}:{client.port}, log {_server_log()})", file=sys.stderr)
            return True
        except ServerUnavailable:
            time.sleep(0.05)
    raise ServerUnavailable(f"cao-server did not become healthy in 15 s; see {_server_log()}")


# Exit codes of a command that waits for an agent's answer; docs/ci.md lists them.
EXIT_AGENT_ERROR, EXIT_NEEDS_ANSWER, EXIT_TIMEOUT = 1, 3, 4


def _send_and_wait(client, terminal_id, message, wait, timeout, report=None):
    """Send a message and, with `wait`, print the answer. Exit 0 with an answer, else
    non-zero with one line on stderr: the agent erred, asks a question, or timed out.
    With `report` (a dict) the answer and what was seen are printed as JSON instead."""
    check_message(message)
    started = time.monotonic()
    client.send_input(terminal_id, message)
    if not wait:
        print(f"Sent to terminal {terminal_id}.")
        return 0
    seen, answer = [], None
    try:
        status, answer = client.wait_for_answer(
            terminal_id, timeout, None if report is not None else f"terminal {terminal_id}", seen)
    except WaitTimeout as e:
        status, problem, code = "timeout", str(e), EXIT_TIMEOUT
    else:
        problem, code = _unanswered(client, terminal_id, status)
    if status in ("completed", "idle") and answer is None:
        problem, code = (f"the agent in terminal {terminal_id} finished but no answer is on its "
                         "screen; look with `cao session status` or tmux attach"), EXIT_AGENT_ERROR
    if report is not None:
        report.update(terminal_id=terminal_id, status=status, answer=answer, statuses=seen,
                      error=problem, answer_seconds=round(time.monotonic() - started, 3))
        print(json.dumps(report, indent=2))
    elif answer is not None:
        print(answer)
    if problem:
        print(f"cao: error: {problem}", file=sys.stderr)
    return code


def _unanswered(client, terminal_id, status):
    """(one-line reason, exit code) when an agent stopped without an answer, else (None, 0)."""
    if status == "error":
        screen = client.output(terminal_id, "full")
        problem = login_problem(client.terminal(terminal_id)["provider"], screen)
        if problem:
            return problem, EXIT_AGENT_ERROR
        tail = _screen_tail(screen, 2).replace("\n", " | ")
        return (f"the agent in terminal {terminal_id} failed (status error); its screen ends: "
                f"{tail or '(empty)'}"), EXIT_AGENT_ERROR
    if status == "waiting_user_answer":
        question = _screen_tail(client.output(terminal_id, "full"), 1)
        return (f"the agent in terminal {terminal_id} waits for an answer ({question}); answer it "
                f"with POST /terminals/{terminal_id}/answer or `tmux attach`"), EXIT_NEEDS_ANSWER
    return None, 0


def _conductor(client, session, terminal_id=None):
    info = client.session(session)
    terms = info["terminals"]
    if terminal_id:
        match = [t for t in terms if t["id"] == terminal_id]
        if not match:
            raise NotFound(f"terminal {terminal_id} is not in session {info['session']['name']}")
        return info, match[0]
    if not terms:
        raise NotFound(f"session {info['session']['name']} has no terminals")
    return info, terms[0]


def _stop_autostarted_server():
    try:
        info = json.loads(read_inside(cao_home() / "server.json", cao_home()))
    except (OSError, ValueError, CaoError):
        return
    pid = info.get("pid")
    if not info.get("autostarted") or not isinstance(pid, int):
        return
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"server" not in f.read():
                return  # the pid was reused by something else
    except OSError:
        pass
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    print(f"Stopped the background cao-server (pid {pid}).")


# -- the commands ----------------------------------------------------------------

@command("doctor", "check this machine: python, tmux, the server, mcp and each agent CLI",
         JSON_OUT)
def cmd_doctor(args):
    checks = _machine_checks() + _provider_checks()
    if args.json:
        print(json.dumps(checks, indent=2))
    else:
        marks = {"ok": "ok", "problem": "!!", "note": "--"}
        for check in checks:
            fix = f"; {check['fix']}" if check.get("fix") else ""
            print(f"[{marks[check['state']]}] {check['name']:14} {check['detail']}{fix}")
        problems = sum(c["state"] == "problem" for c in checks)
        print(f"{problems} problem{'s' * (problems != 1)}" if problems else "cao can run here")
    return 1 if any(c["state"] == "problem" and c.get("blocks") for c in checks) else 0


def _check(name, state, detail, fix=None, blocks=False, **more):
    return {"name": name, "state": state, "detail": detail, "fix": fix, "blocks": blocks, **more}


def _machine_checks():
    import importlib.util
    import platform
    checks = [_check("python", "ok" if sys.version_info >= (3, 10) else "problem",
                     f"{platform.python_version()} ({sys.executable})",
                     None if sys.version_info >= (3, 10) else "install CPython 3.10 or newer",
                     blocks=True)]
    tmux_path = shutil.which("tmux")
    version = command_version([tmux_path, "-V"]) if tmux_path else None
    numbers = re.search(r"(\d+)\.(\d+)", version or "")
    if not tmux_path:
        checks.append(_check("tmux", "problem", "not found on PATH",
                             "install tmux 3.2 or newer (apt install tmux)", blocks=True))
    elif not numbers or (int(numbers[1]), int(numbers[2])) < (3, 2):
        checks.append(_check("tmux", "problem", f"{version or 'unknown version'} ({tmux_path})",
                             "cao needs tmux 3.2 or newer", blocks=True))
    else:
        checks.append(_check("tmux", "ok", f"{version} ({tmux_path})"))
    client = Client()
    try:
        health = client.health(timeout=3)
        checks.append(_check("server", "ok", f"running at http://{client.host}:{client.port} (pid {health.get('pid')}, "
                                             f"version {health.get('version')})"))
    except CaoError:
        checks.append(_check("server", "note", f"not running at http://{client.host}:{client.port}",
                             "`cao-server` starts it; `cao launch` starts one by itself"))
    archive = _zip_archive()
    for module, purpose in (("mcp", "agents delegating work (cao mcp)"), ("croniter", "flows")):
        found = importlib.util.find_spec(module) is not None
        where = "installed"
        if not found and archive:
            try:
                found, where = bool(_vendored_site_packages(archive)), "carried in this cao.pyz"
            except CaoError:
                found = False
        checks.append(_check(module, "ok" if found else "problem",
                             f"{where}, for {purpose}" if found else f"missing: needed for {purpose}",
                             None if found else f"pip install {module}, or use a cao.pyz built "
                                                "with --with-mcp", blocks=module == "mcp"))
    return checks


def _provider_checks():
    """Per provider: its CLI on PATH with its version, and whether a login is visible
    (the names of variables that are set, never their values)."""
    from concurrent.futures import ThreadPoolExecutor
    table = sorted((name, spec) for name, spec in providers().items() if provider_binary(spec))
    paths = {name: shutil.which(provider_binary(spec)) for name, spec in table}
    with ThreadPoolExecutor(8) as pool:  # some CLIs take a second to print a version
        versions = dict(zip(paths, pool.map(
            lambda name: command_version([paths[name], "--version"]) if paths[name] else None,
            paths)))
    checks = []
    for name, spec in table:
        if not paths[name]:
            checks.append(_check(name, "note", f"{provider_binary(spec)} not installed",
                                 spec.get("install") and f"install: {spec['install']}"))
            continue
        detail = f"{versions[name] or 'version unknown'} ({paths[name]})"
        creds = spec.get("credentials")
        if not creds:
            checks.append(_check(name, "ok", detail + "; log in as its docs say"))
            continue
        seen = [v for v in creds.get("env", []) if os.environ.get(v)] + \
               [f for f in creds.get("files", []) if Path(f).expanduser().exists()]
        if seen:
            checks.append(_check(name, "ok", f"{detail}; credentials: {', '.join(seen)}"))
        else:
            looked = ", ".join(creds.get("env", []) + creds.get("files", []))
            checks.append(_check(name, "problem", f"{detail}; no credentials seen ({looked})",
                                 creds.get("fix")))
    return checks


@command("server", "run the cao server (same as cao-server)",
         option("--host", default=None, help="loopback address (default 127.0.0.1)"),
         option("--port", type=_port, default=None, help="port (default 9889)"))
def cmd_server(args):
    host, port = api_address()
    return serve(args.host or host, args.port or port)


@command("launch", "start a session with an agent",
         option("message", nargs="?", help="first message to send to the agent"),
         option("--agents", required=True, metavar="PROFILE", help="agent profile name"),
         option("--provider", help="provider (default: the profile's, else settings)"),
         option("--session-name", help="session name (cao- is prepended)"),
         option("--working-directory", help="agent working directory (default: here)"),
         option("--headless", action="store_true", help="do not attach to tmux"),
         option("--async", dest="async_", action="store_true",
                help="with MESSAGE: send it and return without waiting"),
         option("--yolo", action="store_true", help="unrestricted tools, no confirmations"),
         option("--auto-approve", action="store_true", help="launch without asking"),
         option("--allowed-tools", help="comma-separated tool allowlist"),
         option("--env", action="append", metavar="KEY=VALUE",
                help="a variable for this session's agents (repeatable)"),
         option("--resume-session-id", metavar="ID",
                help="continue this conversation of the agent's CLI (docs/resume.md)"),
         option("--json", action="store_true",
                help="with --headless MESSAGE: print the answer, terminal id, statuses seen "
                     "and durations as JSON (other output goes to stderr)"),
         TIMEOUT)
def cmd_launch(args):
    if args.async_ and not args.message:
        raise CaoError("--async needs a MESSAGE to send; add one or drop --async")
    if args.json and not (args.headless and args.message and not args.async_):
        raise CaoError("--json reports an answer: use it with --headless and a MESSAGE, "
                       "without --async")
    _check_profile_name(args.agents)
    client = Client()
    ensure_server(client)
    if args.message:
        check_message(args.message)
    out = sys.stderr if args.json else sys.stdout
    if not _launch_approved(client, args, out):
        print("Not launched.", file=out)
        return 1
    env_vars = check_env_vars(args.env, "--env") or None
    started = time.monotonic()
    term = client.create_session(
        agent_profile=args.agents, provider=args.provider, session_name=args.session_name,
        env_vars=env_vars, **({"resume_session_id": check_conversation_id(args.resume_session_id)}
                              if args.resume_session_id else {}),
        allowed_tools="*" if args.yolo else args.allowed_tools,
        working_directory=resolve_working_directory(args.working_directory))
    session = term["session_name"]
    print(f"Session created: {session}\nTerminal created: {term['id']} "
          f"({term['agent_profile']}, {term['provider']}, status {term['status']})", file=out)
    if args.message:
        client.wait_for_status(term["id"], READY_STATUSES, 120,
                               None if args.json else f"starting {term['agent_profile']}")
        if args.headless:
            report = {"session_name": session, "agent_profile": term["agent_profile"],
                      "provider": term["provider"],
                      "start_seconds": round(time.monotonic() - started, 3)} if args.json else None
            return _send_and_wait(client, term["id"], args.message, not args.async_, args.timeout,
                                  report)
        client.send_input(term["id"], args.message)
    if args.headless:
        return 0
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("Not on a terminal, so not attaching; watch it with: "
              f"{shlex.join(tmux_argv('attach', '-t', session))}")
        return 0
    os.execvp("tmux", tmux_argv("attach-session", "-t", f"={session}"))


def _launch_approved(client, args, out):
    """Say which tools the agent gets and how they are enforced; on a terminal, ask
    before launching unless --yolo or --auto-approve."""
    profile = client.profile(args.agents)
    provider = args.provider or profile.get("provider") or load_settings().get(
        "default_provider") or DEFAULT_PROVIDER
    tools = profile_tools(profile, "*" if args.yolo else args.allowed_tools)
    enforcement = tool_enforcement(get_provider(provider), tools)
    how = {"none": "nothing is denied", "hard": f"{provider} is not offered the other tools",
           "soft": f"{provider} has no way to deny tools, so the agent is told"}[enforcement]
    role = profile.get("role") or ("(its allowedTools)" if profile.get("allowedTools") is not None
                                   else f"{DEFAULT_ROLE} (default)")
    print(f"Agent {profile['name']} ({provider}): role {role}; tools {', '.join(tools)}; "
          f"enforcement {enforcement}: {how}", file=out)
    if args.yolo or args.auto_approve or not (sys.stdin.isatty() and sys.stdout.isatty()):
        return True
    return input("Launch it? [Y/n] ").strip().lower() in ("", "y", "yes")


@command("install", "install an agent profile (name, .md path or https URL)",
         option("source"),
         option("--provider", help="check that this provider exists"),
         option("--env", action="append", metavar="KEY=VALUE",
                help="set a ${KEY} the profile uses, in ~/.cao/.env (repeatable)"))
def cmd_install(args):
    if args.provider:
        get_provider(args.provider)
    if args.env:
        save_env_file(check_env_vars(args.env, "--env"))
    info = install_profile(args.source)
    print(f"Agent '{info['name']}' installed: {info['path']}")
    if info["unresolved_vars"]:
        print(f"Note: unresolved variables {', '.join(info['unresolved_vars'])}; "
              f"set them in the environment or {cao_home() / '.env'}", file=sys.stderr)
    return 0


@command("shutdown", "shut down sessions",
         one_of(option("--all", action="store_true", help="every cao session (and a server "
                                                          "that `cao launch` started)"),
                option("--session", help="one session by name")))
def cmd_shutdown(args):
    client = Client()
    if not args.all:  # one named session, which must exist: never "all" by accident
        name = session_name_for(args.session)
        client.delete_session(name)
        print(f"Shut down {name}")
        return 0
    names = [s["name"] for s in client.sessions()]
    for name in names:
        try:
            client.delete_session(name)
            print(f"Shut down {name}")
        except NotFound:
            print(f"{name} was already gone")
    if not names:
        print("No cao sessions were running.")
    _stop_autostarted_server()
    return 0


@command("session list", "list sessions", JSON_OUT)
def cmd_session_list(args):
    client = Client()
    rows = []
    for s in client.sessions():
        terms = client.session(s["name"])["terminals"]
        head = terms[0] if terms else {}
        rows.append({"session": s["name"], "conductor": head.get("id", "-"),
                     "status": "lost" if s["status"] == "lost" else head.get("status", "-"),
                     "terminals": len(terms),
                     "agent_profile": head.get("agent_profile")})
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("No cao sessions. Start one with `cao launch --agents <profile>`.")
    else:
        print(f"{'SESSION':<28} {'CONDUCTOR':<10} {'STATUS':<20} TERMINALS")
        for r in rows:
            print(f"{r['session']:<28} {r['conductor']:<10} {r['status']:<20} {r['terminals']}")
    return 0


@command("session resume", "bring back a session whose tmux died, conversations and all",
         option("session", nargs="?", help="the session's name"),
         option("--all", action="store_true", help="every session with lost terminals"),
         JSON_OUT)
def cmd_session_resume(args):
    if bool(args.session) == bool(args.all):
        raise CaoError("name one session or give --all, e.g. `cao session resume --all`")
    client = Client()
    ensure_server(client)
    sessions = client.resume(args.session)["sessions"] if args.all else [client.resume(args.session)]
    if args.json:
        print(json.dumps(sessions, indent=2))
    elif not sessions:
        print("No session has lost terminals; nothing to resume.")
    failed = 0
    for session in sessions if not args.json else ():
        if not session["terminals"]:
            print(f"{session['session_name']}: nothing to resume (no terminal of it is lost)")
        for term in session["terminals"]:
            how = {"conversation": "conversation resumed", "fresh": "started fresh",
                   "failed": "failed"}[term["resumed"]]
            if term["resumed"] == "fresh" and not term.get("detail"):
                how += " (its CLI cannot resume)"
            detail = f": {term['detail']}" if term.get("detail") else ""
            if term.get("interrupted"):
                detail += "; the turn it was running when it was lost is gone: send it again"
            print(f"{session['session_name']} {term['terminal_id']}: {how}, status "
                  f"{term.get('status', 'lost')}{detail}")
    for session in sessions:
        failed += sum(t["resumed"] == "failed" or t.get("status") == "error"
                      for t in session["terminals"])
    return 1 if failed else 0


@command("session status", "conductor status and last output",
         option("session"), TERMINAL,
         option("--workers", action="store_true", help="also list worker terminals"),
         JSON_OUT)
def cmd_session_status(args):
    client = Client()
    info, head = _conductor(client, args.session, args.terminal)
    try:
        last = client.output(head["id"], "last")
    except NotFound:
        last = None
    workers = [t for t in info["terminals"] if t["id"] != head["id"]]
    if args.json:
        print(json.dumps({"session": info["session"], "conductor": head, "last_output": last,
                          "workers": workers if args.workers else None}, indent=2))
        return 0
    print(f"Session:   {info['session']['name']} ({info['session']['status']})")
    print(f"Conductor: {head['id']}  agent={head['agent_profile']}  provider={head['provider']}"
          f"  status={head['status']}")
    print("Last output:")
    print("\n".join("  " + line for line in (last or "(none yet)").split("\n")[:20]))
    if args.workers:
        print(f"Workers ({len(workers)}):")
        for w in workers:
            print(f"  {w['id']}  {w['agent_profile']:<20} {w['provider']:<12} {w['status']}")
    return 0


@command("session send", "send a message and wait for the answer",
         option("session"), option("message"), TERMINAL,
         option("--async", dest="async_", action="store_true", help="do not wait"),
         TIMEOUT)
def cmd_session_send(args):
    client = Client()
    _, head = _conductor(client, args.session, args.terminal)
    if head["status"] not in ("idle", "completed"):
        raise Conflict(f"terminal {head['id']} is {head['status']}, not idle; wait for it "
                       f"(`cao session status {args.session}`) and send again")
    try:
        return _send_and_wait(client, head["id"], args.message, not args.async_, args.timeout)
    except KeyboardInterrupt:
        print(f"cao: interrupted; terminal {head['id']} keeps working - see "
              f"`cao session status {args.session}`", file=sys.stderr)
        return 130


@command("session inbox", "messages sent to a terminal and their delivery state",
         option("session"), TERMINAL,
         option("--status", choices=INBOX_STATES),
         option("--limit", type=int, default=20, choices=range(1, 101), metavar="1-100"),
         JSON_OUT)
def cmd_session_inbox(args):
    client = Client()
    _, head = _conductor(client, args.session, args.terminal)
    rows = client.messages(head["id"], args.limit, args.status)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"No messages for terminal {head['id']}.")
    else:
        print(f"{'ID':>6} {'FROM':<10} {'STATUS':<11} {'CREATED':<20} MESSAGE")
        for r in reversed(rows):
            text = r["message"].split("\n")[0][:60]
            reason = f"  ({r['reason']})" if r["reason"] else ""
            print(f"{r['id']:>6} {r['sender_id']:<10} {r['status']:<11} {r['created_at']:<20} "
                  f"{text}{reason}")
    return 0


def cmd_flow_add(args):
    source = Path(args.file_path).expanduser()
    if not source.is_file():
        raise CaoError(f"{args.file_path} is not a file; pass a flow's .md file")
    flow = read_flow_file(source)
    if flow.get("script"):  # the server runs only scripts inside its own flows folder
        script = (source.parent / flow["script"]).resolve()
        if not script.is_file():
            raise CaoError(f"the flow's script {flow['script']} is not a file next to {source.name}")
        name = check_flow(flow, str(source))["name"]
        target = ensure_home() / "flows" / "scripts" / f"{name}-{script.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        write_inside(target, ensure_home(), script.read_text(encoding="utf-8"), mode=0o755)
        flow["script"] = str(target)
    client = Client()
    ensure_server(client)
    added = client.add_flow(**flow)
    print(f"Flow {added['name']} added: {added['schedule']} runs {added['agent_profile']}; "
          f"next run {added['next_run']}")
    return 0


def cmd_flow_list(args):
    flows = Client().flows()
    if args.json:
        print(json.dumps(flows, indent=2))
    elif not flows:
        print("No flows. Add one with `cao flow add FILE`.")
    else:
        print(f"{'NAME':<20} {'SCHEDULE':<15} {'AGENT':<16} {'ON':<4} {'NEXT RUN':<20} LAST RUN")
        for f in flows:
            last = f"{f['last_run']} {f['last_result']}" if f["last_run"] else "-"
            reason = f" ({f['last_reason']})" if f["last_reason"] else ""
            print(f"{f['name']:<20} {f['schedule']:<15} {f['agent_profile']:<16} "
                  f"{'yes' if f['enabled'] else 'no':<4} {f['next_run'] or '-':<20} {last}{reason}")
    return 0


def cmd_flow_action(args, action):
    result = Client().flow_action(args.name, action)
    if action == "run":
        where = f" in session {result['session']}" if result.get("session") else ""
        print(f"Flow {args.name}: {result['result']}{where}"
              + (f" ({result['reason']})" if result.get("reason") else ""))
        return 0 if result["success"] else 1
    print(f"Flow {args.name}: {action}d." if action != "remove" else f"Flow {args.name} removed.")
    return 0


def _flow_command(action):
    return lambda args: cmd_flow_action(args, action)


for _group in ("flow", "schedule"):
    command(f"{_group} add", "add a flow from its .md file", option("file_path"))(cmd_flow_add)
    command(f"{_group} list", "flows with their last and next run", JSON_OUT)(cmd_flow_list)
    for _action, _help in (("run", "run a flow now"), ("remove", "remove a flow"),
                           ("enable", "turn a flow's schedule on"),
                           ("disable", "turn a flow's schedule off")):
        command(f"{_group} {_action}", _help, option("name"))(_flow_command(_action))


def _skill_store():
    store = SkillStore(ensure_home() / "skills")
    store.seed()
    return store


@command("skills list", "installed skills", JSON_OUT)
def cmd_skills_list(args):
    store = _skill_store()
    skills = store.listing()
    for problem in store.problems:
        print(f"cao: skipped: {problem}", file=sys.stderr)
    if args.json:
        print(json.dumps(skills, indent=2))
    elif not skills:
        print("No skills. Add one with `cao skills add FOLDER`.")
    else:
        width = max(len(s["name"]) for s in skills) + 2
        print(f"{'NAME':<{width}}DESCRIPTION")
        for s in skills:
            text = s["description"]
            print(f"{s['name']:<{width}}{text[:90] + ('...' if len(text) > 90 else '')}")
    return 0


@command("skills add", "install a skill folder (it holds SKILL.md)", option("folder_path"),
         option("--force", action="store_true", help="replace an installed skill of that name"))
def cmd_skills_add(args):
    result = _skill_store().add(args.folder_path, args.force)
    print(f"{'Replaced' if result['replaced'] else 'Installed'} skill {result['name']} "
          f"in {result['path']}")
    return 0


@command("skills remove", "remove an installed skill", option("name"))
def cmd_skills_remove(args):
    _skill_store().remove(args.name)
    print(f"Removed skill {args.name}.")
    return 0


def _confirm(question, yes):
    """True if the user agreed (or passed --yes); without a TTY, --yes is required."""
    if yes:
        return True
    if not sys.stdin.isatty():
        raise CaoError(f"{question.rstrip('?')}: pass --yes to confirm (no terminal to ask on)")
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


MEMORY_SCOPE = option("--scope", choices=MEMORY_SCOPES)
MEMORY_SCOPE_ID = option("--scope-id", help="a project, session or agent name within the scope")
YES = option("-y", "--yes", action="store_true", help="do not ask")


def _print_memories(memories):
    print(f"{'KEY':<28} {'SCOPE':<8} {'TYPE':<10} {'UPDATED':<20} CONTENT")
    for m in memories:
        text = " ".join(m["content"].split())
        print(f"{m['key']:<28} {m['scope']:<8} {m['memory_type']:<10} {m['updated_at']:<20} "
              f"{text[:60] + ('...' if len(text) > 60 else '')}")


@command("memory list", "memories, newest first", MEMORY_SCOPE, MEMORY_SCOPE_ID,
         option("--type", dest="memory_type", choices=MEMORY_TYPES),
         option("--limit", type=int, default=100, choices=range(1, 501), metavar="1-500"),
         option("--all", action="store_true", help="every scope (the default without --scope)"),
         JSON_OUT)
def cmd_memory_list(args):
    memories = Client().memories(args.scope, args.memory_type, args.scope_id, args.limit)
    if args.json:
        print(json.dumps(memories, indent=2))
    elif not memories:
        print("No memories. Agents store them with the memory_store tool.")
    else:
        _print_memories(memories)
    return 0


@command("memory show", "one memory in full", option("key"), MEMORY_SCOPE, MEMORY_SCOPE_ID, JSON_OUT)
def cmd_memory_show(args):
    memories = Client().memory(args.key, args.scope, args.scope_id)
    if args.json:
        print(json.dumps(memories, indent=2))
        return 0
    for m in memories:
        print(f"{m['key']}  ({m['scope']} {m['scope_id']}, {m['memory_type']}, updated "
              f"{m['updated_at']}, recalled {m['access_count']}x{', tags ' + m['tags'] if m['tags'] else ''})")
        print(m["content"].rstrip() + "\n")
    return 0


@command("memory delete", "delete one memory", option("key"), MEMORY_SCOPE, MEMORY_SCOPE_ID, YES)
def cmd_memory_delete(args):
    client = Client()
    found = client.memory(args.key, args.scope, args.scope_id)
    if len(found) == 1 and not _confirm(f"Delete memory {args.key} ({found[0]['scope']})?", args.yes):
        return 1
    client.delete_memory(args.key, args.scope, args.scope_id)
    print(f"Deleted memory {args.key}.")
    return 0


@command("memory clear", "delete every memory of a scope",
         option("--scope", choices=MEMORY_SCOPES, required=True), MEMORY_SCOPE_ID, YES)
def cmd_memory_clear(args):
    what = f"{args.scope} {args.scope_id}" if args.scope_id else f"every {args.scope}"
    if not _confirm(f"Delete {what} memories?", args.yes):
        return 1
    print(f"Deleted {Client().clear_memory(args.scope, args.scope_id)['deleted']} memories.")
    return 0


@command("terminal restore", "open a deleted terminal's scrollback in a new window",
         option("terminal_id"))
def cmd_terminal_restore(args):
    terminal_id = check_terminal_id(args.terminal_id)
    logs = cao_home() / "logs" / "terminal"
    try:
        snap = json.loads(read_inside(logs / f"{terminal_id}.snapshot.json", cao_home()))
    except (OSError, ValueError):
        raise NotFound(f"no snapshot for terminal {terminal_id} in {logs}; only deleted "
                       "terminals have one")
    session = snap["session_name"]
    if session not in tmux_sessions():
        raise NotFound(f"session {session} no longer exists; the scrollback is at "
                       f"{logs / (terminal_id + '.scrollback')}")
    window = f"restored-{snap['window_name']}"[:64]
    cwd = snap.get("working_directory") or str(Path.home())
    scrollback = str(logs / f"{terminal_id}.scrollback")
    shell_argv = ["sh", "-c", 'cat -- "$1"; exec "${SHELL:-sh}"', "cao-restore", scrollback]
    tmux("new-window", "-d", "-t", f"={session}:", "-n", window,
         "-c", tmux_literal(cwd if os.path.isdir(cwd) else str(Path.home())), "--", *shell_argv)
    print(f"Restored terminal {terminal_id} into window {window} of {session}; "
          f"attach with: {shlex.join(tmux_argv('attach', '-t', session))}")
    return 0


@command("info", "show paths, server and current session")
def cmd_info(args):
    client = Client()
    print(f"cao {__version__}\nHome:     {cao_home()}\nDatabase: {cao_home() / 'db' / 'cao.db'}")
    try:
        health = client.health(timeout=5)
        print(f"Server:   http://{client.host}:{client.port} (running, pid {health.get('pid')})")
    except ServerUnavailable:
        print(f"Server:   http://{client.host}:{client.port} (not running)")
        return 0
    terminal_id = os.environ.get("CAO_TERMINAL_ID")
    session = None
    if terminal_id:
        try:
            session = client.terminal(terminal_id)["session_name"]
        except CaoError:
            pass
    elif os.environ.get("TMUX"):
        try:  # the user's own tmux ($TMUX), not cao's socket
            session = subprocess.run(["tmux", "display-message", "-p", "#S"], capture_output=True,
                                     text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            session = None
    if session and session.startswith(SESSION_PREFIX):
        try:
            terms = client.session(session)["terminals"]
            print(f"Session:  {session}\nActive terminals: {len(terms)}")
        except NotFound:
            print(f"Session:  {session} (not known to the server)")
    else:
        print("Not currently in a CAO session.")
    return 0


@command("mcp", "run the MCP server for agents (same as cao-mcp-server)")
def cmd_mcp(args):
    return run_mcp_server()


@command("ops-mcp", "run the MCP server for an agent outside cao (same as cao-ops-mcp-server)")
def cmd_ops_mcp(args):
    return run_mcp_server(OPS_TOOLS, "cao-ops-mcp", "Tools to start, watch, message and end "
                                                   "cao sessions of coding agents")


@command("hook", "report an agent's state from its CLI's hooks (used by providers)",
         option("status", choices=("processing", "completed", "waiting_user_answer")),
         option("payload", nargs="*", type=str, help=argparse.SUPPRESS))
def cmd_hook(args):
    """Run by a CLI's own hooks; it must never fail the CLI, so errors go to a log."""
    terminal_id = os.environ.get("CAO_TERMINAL_ID", "")
    try:
        Client().signal(terminal_id, args.status, _hook_conversation(args.payload))
    except CaoError as e:
        home = cao_home()  # a home that is gone went with its server: never make it again
        try:
            with append_inside(home / "logs" / "hooks.log", home) as log:
                log.write(f"{_iso(time.time())} {terminal_id or '-'} {args.status}: {e}\n".encode())
        except (OSError, CaoError):
            pass
    return 0


HOOK_CONVERSATION_KEYS = ("session_id", "thread-id")  # Claude Code hooks, Codex notify


def _hook_conversation(payload):
    """The CLI's conversation id in what its hook was given: a JSON argument (Codex
    notify) or JSON on stdin (Claude Code hooks); None if there is none."""
    texts = list(payload or ())
    if not sys.stdin.isatty() and select.select([sys.stdin], [], [], 0.5)[0]:
        texts.append(sys.stdin.read(1 << 20))
    for text in texts:
        try:
            data = json.loads(text)
        except ValueError:
            continue
        for key in HOOK_CONVERSATION_KEYS:
            if isinstance(data, dict) and isinstance(data.get(key), str) and \
                    CONVERSATION_ID_RE.fullmatch(data[key]):
                return data[key]
    return None


@command("demo-agent", "run the demo agent (used by the demo provider)",
         option("--profile", default="demo"), option("--session-id"), option("--resume"))
def cmd_demo_agent(args):
    return run_demo_agent(args.profile, args.session_id, args.resume)


# -- the parser and entry points ---------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def add_argument(self, *args, **kwargs):
        if kwargs.get("action", "store") == "store" and "type" not in kwargs:
            kwargs["type"] = _text  # every text argument refuses an empty value
        return super().add_argument(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"cao: error: {message}; see `{self.prog} --help`\n")


def build_parser():
    p = _Parser(prog="cao", description="CLI Agent Orchestrator: run AI coding "
                                "agents in tmux and let them hand work to each other.")
    p.add_argument("-V", "--version", action="version", version=f"cao {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    groups = {}
    for name, help, options, func in COMMANDS:
        group, _, leaf = name.rpartition(" ")
        parent = sub
        if group:
            if group not in groups:
                g = sub.add_parser(group, help=COMMAND_GROUPS[group])
                groups[group] = g.add_subparsers(dest=f"{group}_command", metavar="SUBCOMMAND")
                groups[group].required = True
            parent = groups[group]
        s = parent.add_parser(leaf, help=help)
        for names, kwargs in options:
            if names is None:  # one_of: a group bypasses _Parser.add_argument
                group = s.add_mutually_exclusive_group(required=True)
                for inner, inner_kwargs in kwargs:
                    if inner_kwargs.get("action", "store") == "store":
                        inner_kwargs = {"type": _text, **inner_kwargs}
                    group.add_argument(*inner, **inner_kwargs)
            else:
                s.add_argument(*names, **kwargs)
        s.set_defaults(func=func)
    return p


def _argv_problem(argv):
    for number, arg in enumerate(argv, 1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            raw = arg.encode("utf-8", "surrogateescape")
            return f"argument {number} ({raw!r}) is not valid UTF-8; pass UTF-8 text"
    return None


def main(argv=None, prog=None):
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = {"cao-server": "server", "cao-mcp-server": "mcp", "cao-ops-mcp-server": "ops-mcp"}.get(prog)
    if command:
        argv = [command] + argv
    problem = _argv_problem(argv)
    if problem:
        print(f"cao: error: {problem}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except CaoError as e:
        print(f"cao: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `cao ... | head` closed our output early: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def server_main():
    sys.exit(main(prog="cao-server"))


def mcp_main():
    sys.exit(main(prog="cao-mcp-server"))


def ops_mcp_main():
    sys.exit(main(prog="cao-ops-mcp-server"))


def cli_main():
    sys.exit(main())


###############################################################################
# Provider table ##############################################################
###############################################################################

# Data, last: one entry per CLI. The fields are PROVIDER_FIELDS; the code that
# reads them is in the providers and terminals sections.

_ENTER = ["Enter"]
# "(esc to cancel, 3s)" (Gemini); "(2s · esc to cancel)", "(1s · ↓ 13 tokens · esc to cancel)" (Qwen)
_SPINNER_TIMER = r"\((esc to cancel, \d+m? ?\d*s|\d+m? ?\d*s · (.* · )?esc to cancel)\)"
_RULE = r"^\s*[─━]{20,}"
# Gemini CLI / Qwen Code: an answer (✦) with no past prompt line below it, only the
# input box ("> " or, in yolo mode, "* "; it may hold typed text), and that box drawn
# (not the previous turn's answer, not a half-redrawn screen).
_LAST_SPARKLE_ANSWER = (r"^\s*✦ (?![\s\S]*^\s*> [\s\S]*^\s*[>*] )"
                        r"[\s\S]*(Type your message|\? for shortcuts)")
# The system settings cao points Gemini CLI and Qwen Code at; they win over the user's own.
_NO_SELF_UPDATE = {"enableAutoUpdate": False, "enableAutoUpdateNotification": False}
# The last bullet is an answer with no bullet or prompt below it, and its input box
# is drawn (kimi redraws the whole screen at the end of a turn, top to bottom).
# Kiro's / Q's legacy prompt: "> ", "[developer] > ", "[developer] 3% λ > ", "!> "
_KIRO_PROMPT = r"^(?:\[[\w.-]+\] ?)?(?:\d+% ?)?(?:λ ?)?!?> ?$"
_KIMI_LAST_ANSWER = r"^• (?!Used \w+ \()(?![\s\S]*^(?:• |✨ ))[\s\S]*── input( · \d+ queued)? ──"

PROVIDERS = {
    "demo": {
        "description": "built-in demo agent: answers 'done: <first line>' after CAO_DEMO_DELAY s",
        "command": ["{cao}", "demo-agent", "--profile", "{profile}"],
        "args": {"new_conversation": ["--session-id", "{conversation_id}"],
                 "resume": ["--resume", "{conversation_id}"]},
        # The demo reads no instructions; the file shows what a real CLI would be given.
        "files": {"system-prompt.md": {"when": "system_prompt", "value": "{system_prompt}"}},
        "status": [
            ["waiting_user_answer", r"\[y/n\] ?\Z"],
            ["processing", r"working\.\.\.\Z"],
            ["completed", r"^done: .*\n>( .*)?\Z"],
            ["idle", r"^>( .*)?\Z"],
        ],
        "tail_lines": 5,
        "answer": {"start": r"^> \S", "end": r"^>( .*)?$"},
        "exit": {"keys": ["C-d"]},
    },
    "claude_code": {
        # Its onboarding checks api.anthropic.com, which a gateway or an offline runner
        # cannot pass; these are the two keys it writes at the end of onboarding.
        "first_run": {"file": "~/.claude.json", "done": "hasCompletedOnboarding",
                      "json": {"hasCompletedOnboarding": True, "lastOnboardingVersion": "{cli_version}"}},
        "login_screen": r"Not logged in · (?:Please run|Run) /login",
        "credentials": {"env": ["ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN"], "files": ["~/.claude/.credentials.json"], "fix": "export ANTHROPIC_API_KEY, or run `claude` once and log in"},
        # Input typed mid-turn is queued (while it writes) or added to the turn's next
        # request (while a tool runs), but now and then (2 fresh-clone CI runs of 6) a
        # message typed while it streamed left the input box and never reached the model
        # (docs/providers/claude_code.md). So messages wait until it is idle.
        "eager_input": False,
        "input_lines": 3,
        "description": "Claude Code (Anthropic)",
        "command": ["claude"],
        "install": "npm install -g @anthropic-ai/claude-code",
        # A per-terminal plugin folder holds its skills; the user's own stay where they are.
        # A multi-line paste shows as a placeholder, and an Enter that comes before it is
        # drawn is lost: the message would wait in the box unsent.
        "paste_marker": r"\[Pasted text #\d+",
        "skills_dir": "{context_dir}/claude-plugin/skills",
        "args": {
            "always": [
                "--mcp-config", {"json": {"mcpServers": "{mcp_servers}"}},
                "--allowedTools", "mcp__" + CAO_MCP_NAME,
                # async: Claude would otherwise hold the prompt and the turn's end until
                # the hook process exits (+110 to 150 ms each, measured in bench_providers).
                "--settings", {"json": {"skipDangerousModePermissionPrompt": True, "hooks": {
                    "UserPromptSubmit": [{"hooks": [{"type": "command", "async": True,
                                                     "command": "{hook_command} processing"}]}],
                    "Stop": [{"hooks": [{"type": "command", "async": True,
                                         "command": "{hook_command} completed"}]}],
                    "Notification": [{"matcher": "permission_prompt", "hooks": [{
                        "type": "command", "async": True,
                        "command": "{hook_command} waiting_user_answer"}]}]}}}],
            "system_prompt": ["--append-system-prompt", "{system_prompt}"],
            "model": ["--model", "{model}"],
            "skills": ["--plugin-dir", "{context_dir}/claude-plugin"],
            "yolo": ["--dangerously-skip-permissions"],
            # cao picks the conversation's id, so it knows it before the first turn.
            "new_conversation": ["--session-id", "{conversation_id}"],
            "resume": ["--resume", "{conversation_id}"],
            "restricted": ["--disallowedTools={disallowed_tools}"],
        },
        # Root may use --dangerously-skip-permissions only inside a declared sandbox.
        "env": {"IS_SANDBOX": {"when": "yolo", "value": "1"}, "MCP_TOOL_TIMEOUT": "86400000",
                "DISABLE_AUTOUPDATER": "1"},
        "tools": {"execute_bash": ["Bash", "BashOutput", "KillShell", "Task", "Agent", "Monitor"],
                  "fs_read": ["Read"], "fs_write": ["Edit", "Write", "NotebookEdit"],
                  "fs_list": ["Glob", "Grep"], "web_fetch": ["WebFetch", "WebSearch"]},
        "status": [
            ["waiting_user_answer", r"^\s*Do you want to (proceed|make this edit|create|allow|use)"
                                    r"|^\s*❯ 1\. Yes"],
            # While it streams a long answer the spinner reads "✽ Forming… (1s · ↓ 63
            # tokens)", without "esc to interrupt".
            ["processing", r"esc to interrupt|^[✻✢✳✶✽·*] \S+… \("],
            # Its done line is below its answer; the previous turn's is above.
            ["completed", r"^[✻✢✳✶✽·*] \S+ for \d(?![\s\S]*^● )"],
            # (a ❯ with an answer below it is a past prompt on a half-redrawn screen)
            ["idle", r"^❯(?![\s\S]*^● )|\? for shortcuts|bypass permissions on"],
        ],
        "tail_lines": 60,
        "turn_start_grace": 3.0,
        "answer": {"start": r"^● ", "keep_start": True,
                   "end": r"^[✻✢✳✶✽·*] \S+ for \d|" + _RULE[1:] + r"|^❯"},
        "dialogs": [[r"Yes, I trust this folder", _ENTER],
                    [r"Do you want to use this API key\?", ["Up", "Enter"]],
                    [r"Yes, I accept", ["Down", "Enter"]]],
        "exit": {"text": "/exit"},
    },
    "codex": {
        # It shows its sign-in screen, even with OPENAI_API_KEY set, until `codex login` ran.
        "login": {"file": "~/.codex/auth.json", "env": "OPENAI_API_KEY",
                  "argv": ["login", "--with-api-key"]},
        "login_screen": r"^\s*(?:> |› )?1\. Sign in with ChatGPT|Finish signing in via your browser",
        "credentials": {"env": ["OPENAI_API_KEY"], "files": ["~/.codex/auth.json"], "fix": "run `codex login`, or export OPENAI_API_KEY"},
        "input_lines": 3,
        "description": "Codex CLI (OpenAI)",
        # --no-daemon: otherwise Codex leaves an app-server daemon running after it exits.
        "command": ["codex", "--no-daemon"],
        "install": "npm install -g @openai/codex",
        "args": {
            "always": [
                "-c", {"prefix": f"mcp_servers.{CAO_MCP_NAME}.command=", "toml": "{mcp_command}"},
                "-c", {"prefix": f"mcp_servers.{CAO_MCP_NAME}.args=", "toml": "{mcp_args}"},
                "-c", {"prefix": f"mcp_servers.{CAO_MCP_NAME}.env=", "toml": "{mcp_env}"},
                "-c", f"mcp_servers.{CAO_MCP_NAME}.tool_timeout_sec=86400",
                "-c", f'mcp_servers.{CAO_MCP_NAME}.default_tools_approval_mode="approve"',
                "-c", {"prefix": "notify=", "toml": ["{hook}", "completed"]},
                "-c", "check_for_update_on_startup=false"],
            "system_prompt": ["-c", {"prefix": "developer_instructions=", "toml": "{system_prompt}"}],
            "model": ["--model", "{model}"],
            "yolo": ["--dangerously-bypass-approvals-and-sandbox"],
            # Its id arrives with each notify (thread-id); the subcommand goes last.
            "resume": ["resume", "{conversation_id}"],
        },
        "status": [
            ["waiting_user_answer", r"^\s*(Allow .* to run tool|Would you like to run)"
                                    r"|enter to submit \| esc to cancel|^\s*› 1\. (Allow|Yes)"],
            # An answer still streaming has no "Worked for" line below it yet (and
            # Codex then hides its "esc to interrupt" line); the last turn's is above.
            ["processing", r"esc to interrupt\)|^• (?![\s\S]*^\s*(─ )?Worked for [<\d])"],
            ["completed", r"^\s*(─ )?Worked for [<\d](?![\s\S]*^• )"],
            ["idle", r"\? for shortcuts"],
        ],
        "tail_lines": 60,
        "turn_start_grace": 3.0,
        "answer": {"start": r"^• ", "keep_start": True, "end": r"^\s*(─ )?Worked for [<\d]|^› "},
        "dialogs": [[r"Trust this folder\?|1\. Trust and continue", _ENTER]],
        "exit": {"keys": ["C-c"]},
    },
    "gemini_cli": {
        "login_screen": r"How would you like to authenticate for this project\?"
                          r"|Please visit the following URL to authorize|^Enter the authorization code:",
        "credentials": {"env": ["GEMINI_API_KEY", "GOOGLE_API_KEY", "GOOGLE_APPLICATION_CREDENTIALS"], "files": ["~/.gemini/oauth_creds.json"], "fix": "export GEMINI_API_KEY, or run `gemini` once and log in"},
        # Not eager: input sent while it shows "Thinking..." came back into its input box
        # unsent after the turn (docs/providers/gemini_cli.md).
        "eager_input": False,
        "input_lines": 5,
        "description": "Gemini CLI (Google)",
        "command": ["gemini"],
        "install": "npm install -g @google/gemini-cli",
        "args": {"model": ["--model", "{model}"], "yolo": ["--yolo"],
                 "new_conversation": ["--session-id", "{conversation_id}"],
                 "resume": ["--resume", "{conversation_id}"]},
        # An untrusted folder runs without MCP servers; cao starts agents only in
        # folders its user named, so it trusts them as a person would at the prompt.
        # Gemini (and ink's is-in-ci) start headless and exit when CI or
        # GITHUB_ACTIONS says "true", but an agent in a tmux window is interactive.
        "env": {"GEMINI_CLI_TRUST_WORKSPACE": "true", "CI": "false", "GITHUB_ACTIONS": "false",
                "GEMINI_SYSTEM_MD": {"when": "system_prompt", "value": "{context_dir}/system.md"}},
        "files": {"system.md": {"when": "system_prompt", "value": "{system_prompt}"}},
        # Not GEMINI_CLI_SYSTEM_SETTINGS_PATH: Gemini skips a system settings file unless
        # it and every folder above it are root's and writable by no one else, so for
        # any other user (or below /tmp) cao's MCP server and restrictions were dropped.
        "home_overlay": {"env": "GEMINI_CLI_HOME", "dir": ".gemini", "json": {"settings.json": {
            "mcpServers": {CAO_MCP_NAME: {
                "command": "{mcp_command}", "args": "{mcp_args}", "env": "{mcp_env}",
                "timeout": 86400000, "trust": True}},
            "tools": {"exclude": "{disallowed_tools}"}, "general": _NO_SELF_UPDATE}},
            # Its login picker shows until a choice is saved, even with the key set.
            "when_env": {"GEMINI_API_KEY": {"settings.json": {
                "security": {"auth": {"selectedType": "gemini-api-key"}}}}}},
        "tools": {"execute_bash": ["run_shell_command"], "fs_read": ["read_file", "read_many_files"],
                  "fs_write": ["write_file", "replace"],
                  "fs_list": ["list_directory", "glob", "search_file_content"],
                  "web_fetch": ["web_fetch", "google_web_search"]},
        "status": [
            ["waiting_user_answer", r"Action Required|^\W*● 1\. Allow"],
            ["processing", _SPINNER_TIMER],
            ["completed", _LAST_SPARKLE_ANSWER],
            ["idle", r"Type your message"],
        ],
        "tail_lines": 60,
        "turn_start_grace": 3.0,
        "answer": {"start": r"^\s*✦ ", "keep_start": True,
                   "end": _RULE + r"|^\s*> |\? for shortcuts"},
        "dialogs": [[r"Do you trust the files in this folder\?", _ENTER]],
        "exit": {"text": "/quit"},
    },
}
PROVIDERS["qwen_code"] = {
    **{k: v for k, v in PROVIDERS["gemini_cli"].items() if k != "home_overlay"},
    "input_lines": 4,
    "description": "Qwen Code (Alibaba; a Gemini CLI fork)",
    "command": ["qwen"],
    "install": "npm install -g @qwen-code/qwen-code",
    "login_screen": r"Select Authentication Method|Alibaba ModelStudio · Access Method",
    "credentials": {"env": ["OPENAI_API_KEY", "DASHSCOPE_API_KEY"], "files": ["~/.qwen/oauth_creds.json"],
                    "fix": "export OPENAI_API_KEY (and OPENAI_BASE_URL), or run `qwen` once and log in"},
    "args": {"always": ["--mcp-config", {"json": {"mcpServers": "{mcp_servers}"}}],
             "system_prompt": ["--append-system-prompt", "{system_prompt}"],
             "model": ["--model", "{model}"], "yolo": ["--yolo"],
             "restricted": ["--exclude-tools", "{disallowed_tools}"],
             "new_conversation": ["--session-id", "{conversation_id}"],
             "resume": ["--resume", "{conversation_id}"]},
    # Without this, a first start from a fresh HOME runs `npm install -g` of the latest qwen.
    "env": {"QWEN_CODE_SYSTEM_SETTINGS_PATH": "{context_dir}/settings.json"},
    "files": {"settings.json": {"json": {"general": _NO_SELF_UPDATE}}},
    "mcp_server_keys": {"timeout": 86400000},  # ms; the default 10 min would cut a handoff
    "tools": {"execute_bash": ["run_shell_command"], "fs_read": ["read_file"],
              "fs_write": ["write_file", "edit"], "fs_list": ["list_directory", "glob", "grep_search"],
              "web_fetch": ["web_fetch"]},
    "status": [
        ["waiting_user_answer", r"Waiting for user confirmation|^\W*› 1\. Yes"],
        ["processing", _SPINNER_TIMER],
        ["completed", _LAST_SPARKLE_ANSWER],
        ["idle", r"Type your message|\? for shortcuts"],
    ],
}
# opencode's done line; its sidebar (LSP, MCP) may share the line, far to the right.
_OPENCODE_DONE = r"^\s*▣ .*· \d+(\.\d+)?m?s(\s{8,}\S.*)?\s*$"

PROVIDERS.update({
    "opencode_cli": {
        "credentials": {"env": ["ANTHROPIC_API_KEY", "OPENAI_API_KEY", "OPENROUTER_API_KEY", "OPENCODE_CONFIG_CONTENT"], "files": ["~/.local/share/opencode/auth.json"], "fix": "run `opencode auth login`, or export your model provider's API key (or its config in OPENCODE_CONFIG_CONTENT)"},
        "input_lines": 5,
        "description": "opencode (sst)",
        "command": ["opencode"],
        "install": "npm install -g opencode-ai",
        "args": {"model": ["--model", "{model}"]},
        "paste_marker": r"\[Pasted ~\d+ lines?\]",
        "skills_dir": "{context_dir}/skills",
        "json_env": ["OPENCODE_CONFIG_CONTENT"],  # a CI job may give its whole config there
        "env": {"OPENCODE_CONFIG_CONTENT": {"json": {
                    "mcp": {CAO_MCP_NAME: {"type": "local", "command": "{mcp_argv}",
                                           "environment": "{mcp_env}", "timeout": 86400000}},
                    "instructions": ["{context_dir}/system.md"],
                    "skills": {"paths": ["{skills_dir}"]}}},
                # opencode 1.18 wants an object here; a bare "allow" makes it exit at start.
                "OPENCODE_PERMISSION": {"when": "yolo", "value": '{"*": "allow"}'},
                "OPENCODE_DISABLE_AUTOUPDATE": "1"},
        "files": {"system.md": "{system_prompt}"},
        "status": [
            ["waiting_user_answer", r"Permission required|Allow once\s+Allow always"],
            ["processing", r"esc interrupt"],
            ["completed", _OPENCODE_DONE],
            ["idle", r"ctrl\+p commands|tab agents"],
        ],
        "tail_lines": 60,
        "turn_start_grace": 3.0,
        # The sidebar shares the answer's lines, far to the right.
        # skip_open: its input box below the last answer looks like a prompt box.
        "answer": {"start": r"^\s*(┃|⚙ )", "end": _OPENCODE_DONE,
                   "trim": r"\s{8,}\S.*$", "skip_open": True},
        "exit": {"keys": ["C-c"]},
    },
    "copilot_cli": {
        "login_screen": r"Please use /login to sign in to use Copilot|You must be logged in to send messages",
        "credentials": {"env": ["COPILOT_GITHUB_TOKEN", "GH_TOKEN", "GITHUB_TOKEN", "COPILOT_PROVIDER_API_KEY"], "files": [], "fix": "export GH_TOKEN (a token with Copilot access), or run `copilot` and /login"},
        "input_lines": 3,
        "description": "GitHub Copilot CLI",
        "command": ["copilot", "--no-auto-update"],
        "install": "npm install -g @github/copilot",
        "args": {"always": ["--additional-mcp-config", {"json": {"mcpServers": {CAO_MCP_NAME: {
                                "type": "local", "command": "{mcp_command}", "args": "{mcp_args}",
                                "env": "{mcp_env}", "tools": ["*"],
                                "timeout": 86400000}}}},  # ms; the default 180 s would cut a handoff
                            "--allow-tool", CAO_MCP_NAME],
                 "model": ["--model", "{model}"], "yolo": ["--allow-all"],
                 # --excluded-tools hides them from the model; --deny-tool only refuses a call.
                 "restricted": ["--excluded-tools", "{disallowed_tools}"],
                 "new_conversation": ["--session-id", "{conversation_id}"],
                 "resume": ["--resume", "{conversation_id}"]},
        "env": {"COPILOT_CUSTOM_INSTRUCTIONS_DIRS": {"when": "system_prompt", "value": "{context_dir}"},
                "COPILOT_SKILLS_DIRS": {"when": "skills", "value": "{skills_dir}"}},
        "skills_dir": "{context_dir}/skills",
        # Copilot reads *.instructions.md (not copilot-instructions.md) from these dirs.
        "files": {"cao-profile.instructions.md": {"when": "system_prompt",
                                                  "value": "{system_prompt}"}},
        "tools": {"execute_bash": ["bash", "read_bash", "write_bash", "stop_bash", "list_bash"],
                  "fs_read": ["view"], "fs_write": ["apply_patch", "edit", "create"],
                  "fs_list": ["glob", "rg"], "web_fetch": ["web_fetch"]},
        "status": [
            ["waiting_user_answer", r"Do you want to (use this tool|run this command|allow)"
                                    r"|↑/↓ to navigate"],
            ["processing", r"^\s*[○●◉◎] Working|esc esc (edit prompt|interrupt)"],
            ["completed", r"^ ❯ \S.*\n(?:.*\n)*? ● (?!Tip:|No copilot-instructions|MCP Servers)"],
            ["idle", r"open sidebar|^❯"],
        ],
        "tail_lines": 60,
        "turn_start_grace": 3.0,
        "settle": 0.15,  # it clears the busy footer a frame before the answer's last words
        # A notice drawn after the answer (MCP servers that connected late) ends it.
        "answer": {"start": r"^ ● (?!Tip:|No copilot-instructions|MCP Servers)", "keep_start": True,
                   "end": r"^ [~/]\S*( \[⎇ .*\])?$|^ ● (Tip:|No copilot-instructions|MCP Servers)|"
                          + _RULE[1:]},
        # Resuming a conversation whose CLI died with tmux: its lock can outlive it.
        "dialogs": [[r"Do you trust the files in this folder\?", _ENTER],
                    [r"appears to be in use by another CLI or application", _ENTER]],
        "exit": {"text": "/exit"},
    },
    "kimi_cli": {
        "login_screen": r'(?:Model:|LLM) not set, send "?/login\b',
        "eager_input": True,  # input typed mid-turn waits for its own turn ("1 queued")
        "input_lines": 3,
        "description": "Kimi CLI (Moonshot; the Python kimi-cli 1.51)",
        "command": ["kimi", "--mcp-config", {"json": {"mcpServers": "{mcp_servers}"}}],
        "install": "pip install kimi-cli==1.51.0  (Python >= 3.12)",
        "args": {"system_prompt": ["--agent-file", "{context_dir}/agent.yaml"],
                 "model": ["--model", "{model}"], "yolo": ["--yolo"],
                 # --session starts a conversation under a new id, or continues one.
                 "new_conversation": ["--session", "{conversation_id}"],
                 "resume": ["--session", "{conversation_id}"]},
        "env": {"KIMI_CLI_NO_AUTO_UPDATE": "1"},
        "files": {"agent.yaml": {"when": "system_prompt", "value": {"json": {
            "version": 1, "agent": {"extend": "default",
                                    "system_prompt_args": {"ROLE_ADDITIONAL": "{system_prompt}"}}}}}},
        "status": [
            ["waiting_user_answer", r"─ approval ─|→ \[1\] Approve"],
            # A spinner ("⠋ Using …", "⠋ Composing… <1s · 3 tokens"; the start-up
            # "⠏ MCP Servers: …" line stays drawn), or a prompt or tool line with
            # nothing below it yet: the turn goes on between spinner frames. A turn
            # first waits for the MCP servers: their block (a spinner line, then a
            # "• <server> (connecting)" bullet each) then sits below its prompt.
            ["processing", r"^[🌑🌒🌓🌔🌕🌖🌗🌘]|^[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏] (?!MCP Servers:)"
                           r"|^(?:✨ |• Used \w+ \()(?![\s\S]*^(?:• |✨ ))"
                           r"|^✨ .*\n(?:(?!✨ ).*\n)*?[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏] MCP Servers:.*\n(?:• .*\n)*── input"],
            # Done when the last bullet is an answer: not a tool line ("• Used Shell (…)",
            # shown with no spinner before the model is asked again), and not the
            # start-up MCP list ("• cao-mcp-server (connecting)"), so either below a
            # prompt line or once that list has scrolled away.
            ["completed", r"^✨ .*\n(?:.*\n)*?" + _KIMI_LAST_ANSWER
                          + r"|\A(?![\s\S]*MCP Servers:)[\s\S]*?" + _KIMI_LAST_ANSWER],
            ["idle", r"── input( · \d+ queued)? ──"],
        ],
        "tail_lines": 60,
        "turn_start_grace": 3.0,
        "answer": {"start": r"^• (?!Used \w+ \()", "keep_start": True, "end": r"── input( · \d+ queued)? ──|^✨ "},
        "exit": {"text": "/exit"},
    },
    "hermes": {
        "login_screen": r"isn't configured yet -- no API keys or providers found|^Run setup now\? \[Y/n\]",
        "input_lines": 3,
        "description": "Hermes Agent (Nous Research)",
        "command": ["hermes"],
        "install": "pip install 'hermes-agent[mcp]'  (Python >= 3.12)",
        "args": {"model": ["--model", "{model}"], "yolo": ["--yolo"]},
        "env": {"HERMES_EPHEMERAL_SYSTEM_PROMPT": {"when": "system_prompt", "value": "{system_prompt}"}},
        "status": [
            # A dangerous-command approval times out by itself after 60 s.
            ["waiting_user_answer", r"Dangerous Command|↑/↓ to select, Enter to confirm|^⚠ ❯"],
            ["processing", r"⏱ \d|msg=interrupt"],
            ["completed", r"│ ✓ \d+m?s\b"],
            ["idle", r"^❯|⏲"],
        ],
        "tail_lines": 60,
        "turn_start_grace": 3.0,
        "answer": {"start": r"^╭─ ⚕ ", "end": r"^╰─"},
        "exit": {"text": "/exit"},
    },
    # Below: CLIs that no package registry here carries, so they are written from
    # their documented screens and not run in CI; docs/providers marks them experimental.
    "kiro_cli": {
        "description": "Kiro CLI (AWS) - experimental",
        "command": ["kiro-cli", "chat", "--trust-all-tools"],
        "install": "see https://kiro.dev/docs/cli",
        "args": {"model": ["--model", "{model}"]},
        "status": [
            ["waiting_user_answer", r"Allow this action\?|\[y/n/t\]|❯\s*No, exit"],
            ["processing", r"[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏] Thinking|Kiro is working|esc to cancel"],
            ["completed", r"^> \S[\s\S]*\n" + _KIRO_PROMPT],
            ["idle", r"[Aa]sk a question,? or describe a task|" + _KIRO_PROMPT],
        ],
        "tail_lines": 40,
        "answer": {"start": r"^> (?=\S)", "keep_start": True, "end": _KIRO_PROMPT},
        "dialogs": [[r"Kiro is running in trust all tools mode", ["Down", "Enter"]]],
        "exit": {"text": "/quit"},
    },
    "cursor_cli": {
        "credentials": {"env": ["CURSOR_API_KEY"], "files": [], "fix": "export CURSOR_API_KEY, or run `cursor-agent login`"},
        "description": "Cursor CLI (cursor-agent) - experimental",
        "command": ["cursor-agent"],
        "install": "curl https://cursor.com/install -fsS | bash",
        "args": {"model": ["--model", "{model}"], "yolo": ["--force"]},
        "status": [
            ["waiting_user_answer", r"(?i)do you want to (allow|run)|approve this action|\[\s*y\s*/\s*n\s*\]"
                                    r"|↑/↓ to navigate|do you trust (the )?files? in this folder"],
            ["processing", r"ctrl\+c to stop|[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏✶✢✽✻✳·].*…"],
            ["completed", r"Add a follow-up"],
            ["idle", r"Plan, search, build anything|^\s*[❯>]\s"],
        ],
        "tail_lines": 40,
        "answer": {"start": _RULE, "end": _RULE},
        "exit": {"text": "/exit"},
    },
})
# Amazon Q Developer CLI is Kiro CLI's predecessor and draws the same chat screen.
PROVIDERS["q_cli"] = {
    **PROVIDERS["kiro_cli"],
    "description": "Amazon Q Developer CLI - experimental",
    "command": ["q", "chat", "--trust-all-tools"],
    "install": "see https://docs.aws.amazon.com/amazonq/latest/qdeveloper-ug/command-line.html",
    "dialogs": [],
}


if __name__ == "__main__":
    cli_main()
