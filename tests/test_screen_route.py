"""GET /terminals/{id}/screen: the visible screen with colours for a browser terminal,
long-polled on the client's etag so an idle terminal costs nothing."""
import threading
import time

from conftest import demo_session


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
