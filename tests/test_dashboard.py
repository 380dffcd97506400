"""The web console in a real browser: Debian's chromium driven by Playwright, against
a real cao server with demo agents on a private tmux socket.

Every check waits with a deadline (Playwright's expect polls); nothing sleeps.
"""
import os
import signal
from pathlib import Path

import pytest

from conftest import kill_pid, wait_for

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect
CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        pytest.fail("Debian's chromium is missing; .ci/run installs it (apt install chromium)",
                    pytrace=False)
    pytest.skip("no /usr/bin/chromium (apt install chromium)", allow_module_level=True)

# Flags that keep chromium off the network it cannot reach here, and running as root.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync",
                 "--disable-dev-shm-usage"]
WAIT_MS = 20000


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1500, "height": 900})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"http://127.0.0.1:{server.port}/")
    expect(page.locator("#conn")).to_have_text("live", timeout=WAIT_MS)
    yield page
    context.close()
    assert not errors, errors


def _session(server, name, profile="developer"):
    code, body = server.request("POST", "/sessions", {"agent_profile": profile, "provider": "demo",
                                                      "session_name": name})
    assert code == 201, body
    wait_for(lambda: server.request("GET", f"/terminals/{body['id']}")[1]["status"] == "idle", 20,
             what="the demo agent's prompt")
    return body


def _node(page, name):
    return page.locator(f".tree .node:has(.name:text-is('{name}'))")


def _screen(page):
    return page.locator(".pane:not([hidden]) .xterm-rows")


def test_launch_from_the_ui_type_into_the_terminal_and_see_the_answer_drawn(page, server):
    page.keyboard.press("n")
    dialog = page.locator("#launch-dialog")
    expect(dialog).to_be_visible()
    dialog.locator("select[name=agent_profile]").select_option("developer")
    dialog.locator("select[name=provider]").select_option("demo")
    dialog.locator("input[name=session_name]").fill("ui")
    dialog.locator("input[name=working_directory]").fill(str(server.workdir))
    dialog.get_by_role("button", name="Launch").click()
    expect(dialog).to_be_hidden(timeout=WAIT_MS)

    terminals = server.request("GET", "/sessions/ui")[1]["terminals"]
    assert [t["agent_profile"] for t in terminals] == ["developer"]
    node = _node(page, terminals[0]["name"])
    expect(node.locator(".st")).to_have_text("idle", timeout=WAIT_MS)
    expect(node.locator(".sub")).to_contain_text("developer \u00b7 demo \u00b7 role developer")
    expect(_screen(page)).to_contain_text("cao demo agent (profile: developer)", timeout=WAIT_MS)

    page.locator(".pane:not([hidden]) .xterm").click()
    page.keyboard.type("hello; from the browser")
    page.keyboard.press("Enter")
    expect(_screen(page)).to_contain_text("done: hello; from the browser", timeout=WAIT_MS)
    expect(node.locator(".st")).to_have_text("completed", timeout=WAIT_MS)

    page.keyboard.press("Control+c")  # the demo agent exits on Ctrl-C
    expect(node.locator(".st")).to_have_text("error", timeout=WAIT_MS)


def test_an_approval_is_answered_from_the_approvals_list(page, server):
    term = _session(server, "asks")
    assert server.request("POST", f"/terminals/{term['id']}/input",
                          {"message": "/ask Ship the release?"})[0] == 200
    expect(page.locator("#approvals-count")).to_have_text("1", timeout=WAIT_MS)
    card = page.locator(f"#approvals .card[data-id='{term['id']}']")
    expect(card.locator("pre")).to_contain_text("Ship the release? [y/n]", timeout=WAIT_MS)
    card.get_by_role("button", name="Yes").click()
    expect(page.locator("#approvals .card")).to_have_count(0, timeout=WAIT_MS)
    expect(page.locator("#approvals-btn")).to_be_hidden()
    wait_for(lambda: "done: answered y" in server.request(
        "GET", f"/terminals/{term['id']}/output?mode=full")[1]["output"], 20, what="the demo's answer")


def test_an_inbox_message_is_queued_from_the_ui_and_delivered(page, server):
    term = _session(server, "mail")
    _node(page, term["name"]).click()
    page.keyboard.press("m")
    expect(page.locator("#inbox-target")).to_have_text(term["name"])
    page.locator("#inbox-msg").fill("please run the tests")
    page.locator("#inbox-msg").press("Control+Enter")
    card = page.locator("#inbox .card").first
    expect(card).to_contain_text("from dashboard")
    expect(card.locator(".tag")).to_have_text("delivered", timeout=WAIT_MS)
    expect(_screen(page)).to_contain_text("done: please run the tests", timeout=WAIT_MS)
    # A message from another agent shows up too, while the panel is open.
    assert server.request("POST", f"/terminals/{term['id']}/inbox/messages",
                          {"sender_id": "deadbeef", "message": "second note"})[0] == 200
    expect(page.locator("#inbox .card", has_text="from deadbeef")).to_be_visible(timeout=WAIT_MS)


def test_a_flow_runs_from_the_flows_panel(page, server):
    code, body = server.request("POST", "/flows", {
        "name": "nightly", "schedule": "0 3 * * *", "agent_profile": "developer",
        "provider": "demo", "prompt_template": "Summarise the day"})
    assert code == 201, body
    page.keyboard.press("f")
    card = page.locator("#flows .card[data-flow='nightly']")
    expect(card).to_contain_text("Last: never")
    card.get_by_role("button", name="Run now").click()
    expect(card).to_contain_text("executed", timeout=WAIT_MS)
    expect(page.locator(".tree .sess[data-session='cao-flow-nightly']")).to_be_visible(timeout=WAIT_MS)
    card.get_by_role("button", name="Disable").click()
    expect(card.locator(".tag")).to_have_text("disabled", timeout=WAIT_MS)


def test_a_worker_nests_under_its_caller_and_terminals_show_side_by_side(page, server):
    sup = _session(server, "team", profile="code_supervisor")
    _node(page, sup["name"]).click()
    page.keyboard.press("w")
    dialog = page.locator("#worker-dialog")
    expect(dialog.locator("#worker-caller")).to_have_text(sup["name"])
    dialog.locator("select[name=provider]").select_option("demo")
    dialog.get_by_role("button", name="Add worker").click()
    expect(dialog).to_be_hidden(timeout=WAIT_MS)
    worker = [t for t in server.request("GET", "/sessions/team")[1]["terminals"] if t["id"] != sup["id"]][0]
    assert worker["caller_id"] == sup["id"]
    nested = page.locator(f".tree .node[data-id='{sup['id']}'] + ul .node[data-id='{worker['id']}']")
    expect(nested).to_contain_text(f"from {sup['name']}", timeout=WAIT_MS)

    page.keyboard.press("\\")
    expect(page.locator(".pane:not([hidden])")).to_have_count(2)
    expect(page.locator(".pane:not([hidden]) .xterm-rows").nth(1)).to_contain_text(
        "cao demo agent", timeout=WAIT_MS)

    page.keyboard.press("Delete")
    page.locator("#confirm-ok").click()
    expect(page.locator(f".tree .node[data-id='{worker['id']}']")).to_have_count(0, timeout=WAIT_MS)
    assert server.request("GET", f"/terminals/{worker['id']}")[0] == 404


def test_help_overlay_and_api_errors_are_shown(page, server):
    page.keyboard.press("?")
    help_dialog = page.locator("#help-dialog")
    expect(help_dialog).to_be_visible()
    expect(help_dialog).to_contain_text("Type into the current terminal")
    page.keyboard.press("Escape")
    expect(help_dialog).to_be_hidden()

    page.keyboard.press("n")
    dialog = page.locator("#launch-dialog")
    dialog.locator("select[name=provider]").select_option("demo")
    dialog.locator("input[name=session_name]").fill("no spaces allowed")
    dialog.get_by_role("button", name="Launch").click()
    toast = page.locator(".toast.error")
    expect(toast).to_contain_text("POST /sessions:", timeout=WAIT_MS)
    expect(dialog).to_be_visible()  # the form stays, so the user can fix it


def test_the_page_says_when_the_server_is_down_and_recovers_by_itself(page, server):
    banner = page.locator("#banner")
    expect(banner).to_be_hidden()
    kill_pid(server.servers.pop(), signal.SIGTERM)
    expect(banner).to_contain_text("unreachable", timeout=WAIT_MS)
    expect(page.locator("#conn")).to_have_text("offline")
    server.start_server()
    _session(server, "after")
    expect(banner).to_be_hidden(timeout=WAIT_MS)
    expect(page.locator("#conn")).to_have_text("live")
    expect(page.locator(".tree .sess[data-session='cao-after']")).to_be_visible(timeout=WAIT_MS)


def test_catalog_panels_and_shutting_down_a_session(page, server):
    term = _session(server, "catalog")
    assert server.request("POST", "/internal/memory/store", {
        "content": "Run the tests with pytest -q", "key": "test-command", "scope": "global",
        "terminal_context": {"terminal_id": term["id"]}})[0] == 200
    page.keyboard.press("p")
    expect(page.locator("#profiles .card[data-name='reviewer']")).to_contain_text("role reviewer")
    expect(page.locator("#providers tr[data-name='demo'] .tag")).to_have_text("installed")
    page.keyboard.press("s")
    skill = page.locator("#skills .card[data-name='cao-worker-protocols']")
    skill.get_by_role("button", name="View").click()
    expect(page.locator("#skill-dialog pre")).to_contain_text("#")
    page.keyboard.press("Escape")
    page.keyboard.press("r")
    memory = page.locator("#memory .card", has_text="test-command")
    expect(memory).to_contain_text("Run the tests with pytest -q")
    memory.get_by_role("button", name="Forget test-command").click()
    page.locator("#confirm-ok").click()
    expect(page.locator("#memory .card")).to_have_count(0, timeout=WAIT_MS)
    assert server.request("GET", "/memory")[1] == []
    page.keyboard.press("u")
    expect(page.locator("#plugins-empty")).to_be_visible()

    page.get_by_role("button", name="Shut down cao-catalog").click()
    page.locator("#confirm-ok").click()
    expect(page.locator(".tree .sess[data-session='cao-catalog']")).to_have_count(0, timeout=WAIT_MS)
    assert server.request("GET", "/sessions/catalog")[0] == 404
