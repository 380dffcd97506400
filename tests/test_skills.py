"""Skills: the store, `cao skills`, the REST routes, the built-ins seeded at start,
delivery to each new terminal and the load_skill tool through the real MCP chain."""
import hashlib
import json
import os
from pathlib import Path

import pytest

import cao

from conftest import call_tool, kill_pid

FIXTURES = Path(__file__).parent / "fixtures" / "skills"


def _tree(folder):
    return {str(p.relative_to(folder)): (p.read_bytes(), os.access(p, os.X_OK))
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _skill(root, name, front=None, body="Do the thing.\n"):
    folder = root / name
    folder.mkdir(parents=True)
    front = {"name": name, "description": f"when {name} helps"} if front is None else front
    lines = "".join(f"{k}: {v}\n" for k, v in front.items())
    (folder / "SKILL.md").write_text(f"---\n{lines}---\n{body}")
    return folder


def test_upstream_shaped_skills_install_unchanged_and_can_be_replaced_and_removed(cao_env):
    for name in ("review-helper", "apps-guide"):
        out = cao_env.run("skills", "add", str(FIXTURES / name))
        assert out.returncode == 0 and f"Installed skill {name}" in out.stdout, out.stderr
        assert _tree(cao_env.home / "skills" / name) == _tree(FIXTURES / name)
    listed = cao_env.run("skills", "list", "--json")
    skills = {s["name"]: s for s in json.loads(listed.stdout)}
    assert set(skills) >= {"review-helper", "apps-guide", *cao.BUILTIN_SKILLS}
    assert skills["review-helper"]["description"].startswith("Review a change set for correctness")
    assert "or \"check my diff\"" in skills["review-helper"]["description"]  # folded lines
    again = cao_env.run("skills", "add", str(FIXTURES / "apps-guide"))
    assert again.returncode != 0 and "already installed; add --force" in again.stderr
    forced = cao_env.run("skills", "add", str(FIXTURES / "apps-guide"), "--force")
    assert forced.returncode == 0 and "Replaced skill apps-guide" in forced.stdout
    assert not [p for p in (cao_env.home / "skills").iterdir() if p.name.startswith(".apps")]
    assert cao_env.run("skills", "remove", "apps-guide").returncode == 0
    assert not (cao_env.home / "skills" / "apps-guide").exists()
    gone = cao_env.run("skills", "remove", "apps-guide")
    assert gone.returncode != 0 and "is not in" in gone.stderr


@pytest.mark.parametrize("make, error", [
    (lambda root: root / "missing", "is not a folder"),
    (lambda root: (root / "empty").mkdir() or root / "empty", "has no SKILL.md"),
    (lambda root: _skill(root, "mismatch", {"name": "other", "description": "x"}),
     "differs from its folder"),
    (lambda root: _skill(root, "Bad Name", {"name": "Bad Name", "description": "x"}),
     "must be a lowercase name"),
    (lambda root: _skill(root, "nodesc", {"name": "nodesc"}), "needs a `description`"),
    (lambda root: _skill(root, "badyaml", {"name": "badyaml", "description": "[unclosed"}),
     "flow collection must close"),
    (lambda root: (_skill(root, "linky") / "secret").symlink_to("/etc/passwd") or root / "linky",
     "is a symbolic link"),
])
def test_bad_skill_folders_get_a_one_line_error(cao_env, tmp_path, make, error):
    root = tmp_path / "src"
    root.mkdir()
    folder = make(root)
    out = cao_env.run("skills", "add", str(folder))
    assert out.returncode != 0 and error in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert not any(p.name not in cao.BUILTIN_SKILLS for p in (cao_env.home / "skills").iterdir())


def test_builtins_are_seeded_at_start_and_a_users_edit_is_kept(cao_env):
    proc = cao_env.start_server()
    code, skills = cao_env.request("GET", "/skills")
    assert code == 200 and {s["name"] for s in skills} >= set(cao.BUILTIN_SKILLS)
    code, guide = cao_env.request("GET", "/skills/cao-worker-protocols")
    assert code == 200 and "send_message" in guide["content"] and not guide["content"].startswith("---")
    edited = cao_env.home / "skills" / "cao-supervisor-protocols" / "SKILL.md"
    edited.write_text(edited.read_text() + "\nOur team's rule: always handoff to reviewer.\n")
    stale = cao_env.home / "skills" / "cao-worker-protocols"
    old = "---\nname: cao-worker-protocols\ndescription: an older version\n---\nold\n"
    (stale / "SKILL.md").write_text(old)
    (stale / cao.SEED_MARK).write_text(hashlib.sha256(old.encode()).hexdigest() + "\n")
    kill_pid(proc.pid)
    cao_env.start_server()
    assert "Our team's rule" in edited.read_text()  # edited by the user: kept
    assert "older version" not in (stale / "SKILL.md").read_text()  # untouched copy: updated
    assert cao_env.request("GET", "/skills/..")[0] == 400
    assert cao_env.request("GET", "/skills/..%2F..%2Fetc%2Fpasswd")[0] == 404
    assert cao_env.request("GET", "/skills/nope")[0] == 404


def test_profile_skills_reach_the_prompt_as_a_catalog_and_load_skill_reads_one(cao_env):
    cao_env.run("skills", "add", str(FIXTURES / "review-helper"))
    cao_env.run("skills", "add", str(FIXTURES / "apps-guide"))
    store = cao_env.home / "agent-store"
    store.mkdir(parents=True, exist_ok=True)
    (store / "picky.md").write_text("---\nname: picky\ndescription: picky\nskills: [review-*, "
                                    "cao-worker-protocols]\n---\nYou review.\n")
    cao_env.start_server()
    code, term = cao_env.request("POST", "/sessions?agent_profile=picky&provider=demo&session_name=sk")
    assert code == 201, term
    prompt = (cao_env.home / "terminals" / term["id"] / "system-prompt.md").read_text()
    assert prompt.startswith("You review.") and "## Skills" in prompt and "load_skill" in prompt
    assert "**review-helper**: Review a change set" in prompt
    assert "**cao-worker-protocols**" in prompt
    assert "apps-guide" not in prompt and "cao-supervisor-protocols" not in prompt
    tools, body = call_tool(cao_env, "load_skill", {"name": "review-helper"}, term["id"])
    assert "load_skill" in tools and body.startswith("# Review helper")
    _, missing = call_tool(cao_env, "load_skill", {"name": "nope"}, term["id"])
    assert missing["success"] is False and "skill 'nope' is not installed" in missing["error"]


def test_extra_skill_folders_are_set_through_the_api_and_the_store_wins_a_clash(cao_env, tmp_path):
    extra = tmp_path / "team-skills"
    _skill(extra, "team-only")
    _skill(extra, "review-helper", body="the team's copy\n")
    cao_env.run("skills", "add", str(FIXTURES / "review-helper"))
    cao_env.start_server()
    code, dirs = cao_env.request("POST", "/settings/skill-dirs", {"extra_dirs": [str(extra)]})
    assert code == 200 and dirs["extra_dirs"] == [str(extra.resolve())], dirs
    assert cao_env.request("GET", "/settings/skill-dirs")[1] == dirs
    skills = {s["name"]: s for s in cao_env.request("GET", "/skills")[1]}
    assert skills["team-only"]["source"] == str(extra.resolve())
    assert skills["review-helper"]["source"] == "cao"
    assert "team's copy" not in cao_env.request("GET", "/skills/review-helper")[1]["content"]
    code, body = cao_env.request("POST", "/settings/skill-dirs", {"extra_dirs": [str(tmp_path / "no")]})
    assert code == 400 and "is not a folder" in body["detail"]
    code, body = cao_env.request("POST", "/settings/skill-dirs", {"extra_dirs": [str(cao_env.home)]})
    assert code == 400 and "inside cao's home" in body["detail"]
