"""Status detection, dialog answers and answer extraction over the recorded screen corpus.

tests/fixtures/screens/<cli>-<version>/ holds captures of real CLIs (plain text and
with escapes); labels.json says what each one shows. bench/capture_screens.py refreshes
the corpus for a new CLI version.
"""
import json
import re
from pathlib import Path

import pytest

import cao

CORPUS = Path(__file__).parent / "fixtures" / "screens"
LABELS = json.loads((CORPUS / "labels.json").read_text(encoding="utf-8"))
CASES = [(folder, name, label) for folder, entry in sorted(LABELS.items())
         for name, label in sorted(entry["screens"].items())]
ESCAPES = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[()][0-9A-Z])")


def _spec(folder):
    return cao.PROVIDERS[LABELS[folder]["provider"]]


@pytest.mark.parametrize("folder,name,label", CASES, ids=[f"{f}/{n}" for f, n, _ in CASES])
def test_recorded_screen_reads_as_labelled(folder, name, label):
    spec = _spec(folder)
    variants = [v for v in (f"{name}.txt", f"{name}.ansi.txt") if (CORPUS / folder / v).exists()]
    assert variants
    for variant in variants:
        screen = (CORPUS / folder / variant).read_text(encoding="utf-8")
        screen = ESCAPES.sub("", screen)
        if "dialog" in label:
            assert cao.pending_dialog(spec, screen) == label["dialog"], variant
            continue
        assert cao.detect_status(spec, screen) == label["status"], variant
        if "answer" in label:
            assert cao.extract_answer(spec, screen) == label["answer"], variant


def test_every_registry_cli_has_a_corpus_with_every_state():
    covered = {}
    for entry in LABELS.values():
        states = {label.get("status") for label in entry["screens"].values()}
        covered[entry["provider"]] = states
    registry_clis = {"claude_code", "codex", "gemini_cli", "opencode_cli", "copilot_cli",
                     "qwen_code", "kimi_cli", "hermes"}
    assert set(covered) == registry_clis
    for provider, states in covered.items():
        assert {"idle", "processing", "completed", "waiting_user_answer"} <= states, provider


def test_every_registry_cli_is_captured_at_both_sizes():
    """bench/capture_screens.py writes <state>-<W>x<H> for each state."""
    for entry in LABELS.values():
        names = set(entry["screens"])
        for size in ("220x50", "80x24"):
            for state in ("idle", "processing", "completed", "waiting_user_answer"):
                assert f"{state}-{size}" in names, (entry["provider"], state, size)


def test_completed_screens_give_the_mock_answer():
    answers = [label["answer"] for entry in LABELS.values() for label in entry["screens"].values()
               if label.get("status") == "completed" and "answer" in label]
    assert len(answers) >= 25
    assert all(a.startswith(("MOCK-ANSWER-42", "MOCK-TOOL-DONE-42", "CAPTURE-ANSWER-7"))
               for a in answers), answers


@pytest.mark.parametrize("folder,input_line", [
    ("claude-2.1.197", r"(?m)^❯\s*$"),
    ("codex-0.169.0", r"(?m)^› Ask Codex to do anything.*$"),
    ("qwen-code-0.15.10", r"(?m)^>   Type your message or @path/to/file.*$"),
])
def test_text_pasted_into_the_input_box_keeps_the_answer_completed(folder, input_line):
    """cao pastes a message before it presses Enter; meanwhile the old answer stands."""
    screen = ESCAPES.sub("", (CORPUS / folder / "completed.txt").read_text(encoding="utf-8"))
    typed, count = re.subn(input_line, screen[re.search(input_line, screen).start()] +
                           " the next question", screen, count=1)
    assert count == 1
    spec = _spec(folder)
    assert cao.detect_status(spec, typed) == "completed"
    assert cao.extract_answer(spec, typed) == LABELS[folder]["screens"]["completed"]["answer"]


DOCUMENTED = json.loads((CORPUS / "documented.json").read_text(encoding="utf-8"))
DOCUMENTED_CASES = [(provider, name, label) for provider, entry in sorted(DOCUMENTED.items())
                    if not provider.startswith("_") for name, label in sorted(entry.items())]


@pytest.mark.parametrize("provider,name,label", DOCUMENTED_CASES,
                         ids=[f"{p}/{n}" for p, n, _ in DOCUMENTED_CASES])
def test_experimental_entry_reads_its_documented_screen(provider, name, label):
    """kiro_cli, q_cli and cursor_cli cannot run here: their entries are pinned
    against screens written from their documented markers (documented.json)."""
    spec = cao.PROVIDERS[provider]
    if "dialog" in label:
        assert cao.pending_dialog(spec, label["text"]) == label["dialog"]
        return
    assert cao.detect_status(spec, label["text"]) == label["status"]
    if "answer" in label:
        assert cao.extract_answer(spec, label["text"]) == label["answer"]
