"""GET /terminals/{id}/screen: the visible screen with colours for a browser terminal,
long-polled on the client's etag so an idle terminal costs nothing."""
import threading
import time

from conftest import demo_session, wait_for


def test_screen_is_sent_again_only_when_it_changed(server):
    tid = demo_session(server, "scr")
    code, first = server.request("GET", f"/terminals/{tid}/screen")
    assert code == 200 and first["changed"] and "cao demo agent" in first["screen"]
    assert first["size"] == [220, 50] and first["cursor"][1] >= 1
    started = time.monotonic()
    code, same = server.request("GET", f"/terminals/{tid}/screen?etag={first['etag']}&wait=0.5")
    assert code == 200 and same == {"terminal_id": tid, "changed": False, "etag": first["etag"]}
    assert time.monotonic() - started >= 0.45  # it waited for a change that did not come
    timer = threading.Timer(0.3, server.request, ("POST", f"/terminals/{tid}/input",
                                                  {"message": "hello screen"}))
    timer.start()
    code, changed = server.request("GET", f"/terminals/{tid}/screen?etag={first['etag']}&wait=20")
    timer.join()
    assert code == 200 and changed["changed"] and changed["etag"] != first["etag"]
    assert "> hello screen" in changed["screen"]
    assert server.request("GET", f"/terminals/{tid}/screen?wait=99")[0] == 400
    assert server.request("GET", "/terminals/abcdef12/screen")[0] == 404


def test_keys_typed_in_a_browser_terminal_become_tmux_keys():
    import cao
    literal = cao._LITERAL
    assert [cao._typed_key(t) for t in cao._TYPED_TOKEN_RE.findall(
        "ab;c\r\x03\x1b\t\x7f\x1b[A\x1b[B\x1bOC\x1b[D\x1b[1;5C\x1b[3~\x1b[5~\x1bf\x1b[Z")] == [
        literal, "Enter", "C-c", "Escape", "Tab", "BSpace", "Up", "Down", "Right", "Left",
        "C-Right", "DC", "PPage", "M-f", "BTab"]
    assert cao._typed_key("\x1b[99x") is None


def test_typed_text_reaches_the_agent_literally_and_bad_keys_are_refused(server):
    tid = demo_session(server, "typed")
    # tmux would read a last ';' as a command separator and "Enter" as a key name.
    assert server.request("POST", f"/terminals/{tid}/keys", {"data": "Enter a;b;"})[0] == 200
    assert server.request("POST", f"/terminals/{tid}/keys", {"data": "\r"})[0] == 200
    wait_for(lambda: "done: Enter a;b;" in server.request(
        "GET", f"/terminals/{tid}/output")[1]["output"], 20, what="the typed line's answer")
    code, body = server.request("POST", f"/terminals/{tid}/keys", {"data": "x\x1b[99x"})
    assert code == 400 and "unsupported key sequence" in body["detail"]
    assert server.request("POST", f"/terminals/{tid}/keys", {"data": ""})[0] == 400
    assert server.request("POST", f"/terminals/{tid}/keys", {"data": "y" * 5000})[0] == 400
    assert server.request("POST", "/terminals/abcdef12/keys", {"data": "x"})[0] == 404


def test_approvals_lists_each_waiting_agent_with_its_question(server):
    tid = demo_session(server, "waits")
    assert server.request("GET", "/approvals") == (200, [])
    assert server.request("POST", f"/terminals/{tid}/input", {"message": "/ask Deploy now?"})[0] == 200
    waiting = wait_for(lambda: server.request("GET", "/approvals")[1], 20, what="an approval")
    assert [w["id"] for w in waiting] == [tid]
    assert waiting[0]["status"] == "waiting_user_answer"
    assert waiting[0]["question"].endswith("? Deploy now? [y/n]")
    assert server.request("POST", f"/terminals/{tid}/answer", {"answer": "n"})[0] == 200
    wait_for(lambda: server.request("GET", "/approvals")[1] == [], 20, what="the approval to clear")
    assert [t["id"] for t in server.request("GET", "/terminals")[1]] == [tid]


def test_one_long_poll_follows_several_screens_and_answers_with_the_changed_one(server):
    quiet, busy = demo_session(server, "quiet"), demo_session(server, "busy")
    code, body = server.request("GET", f"/screens?terminal={quiet}&terminal={busy}")
    assert code == 200 and {s["terminal_id"] for s in body["screens"]} == {quiet, busy}
    etags = {s["terminal_id"]: s["etag"] for s in body["screens"]}
    query = f"terminal={quiet}:{etags[quiet]}&terminal={busy}:{etags[busy]}"
    assert server.request("GET", f"/screens?{query}&wait=0.3") == (200, {"screens": []})
    timer = threading.Timer(0.3, server.request, ("POST", f"/terminals/{busy}/input",
                                                  {"message": "only me"}))
    timer.start()
    code, body = server.request("GET", f"/screens?{query}&wait=20")
    timer.join()
    assert code == 200 and [s["terminal_id"] for s in body["screens"]] == [busy]
    assert "> only me" in body["screens"][0]["screen"]
    assert server.request("DELETE", f"/terminals/{quiet}")[0] == 200
    code, body = server.request("GET", f"/screens?terminal={quiet}:{etags[quiet]}&wait=5")
    assert code == 200 and body["screens"] == [{"terminal_id": quiet, "changed": True, "gone": True}]
    assert server.request("GET", "/screens")[0] == 400
    assert server.request("GET", "/screens?terminal=nothex!")[0] == 400
    assert server.request("GET", "/screens?" + "&".join(["terminal=abcdef12"] * 65))[0] == 400
