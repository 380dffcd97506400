// cao dashboard: sessions, terminals and live status over long-polled /events.
// Vanilla JS, no dependencies. Data is only ever inserted with textContent.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const sessions = new Map(); // session name -> {session, terminals: [...]}
  let selected = null;        // selected terminal id
  let cursor = 0;             // last event seq seen
  let outTimer = null, outBusy = false, outAgain = false;

  async function api(method, path, body, signal) {
    const opts = body === undefined ? { method, signal }
      : { method, signal, headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
    const res = await fetch(path, opts);
    const data = await res.json().catch(() => null);
    if (!res.ok) {
      const err = new Error((data && data.detail) || res.status + " " + res.statusText);
      err.status = res.status;
      throw err;
    }
    return data;
  }
  const enc = encodeURIComponent;
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function button(text, cls, key) {
    const b = el("button", cls, text);
    b.type = "button";
    b.dataset.key = key;
    return b;
  }
  function setBadge(e, status) {
    status = status || "unknown";
    e.className = "badge " + status;
    e.textContent = status.replace(/_/g, " ");
    return e;
  }

  function fail(e) { $("error-text").textContent = e.message || String(e); $("error").hidden = false; }
  function clearError() { $("error").hidden = true; }

  // Wrap a user action: clear the old error, disable the button while busy, show failures.
  function action(btn, fn, busyLabel) {
    return async (ev) => {
      if (ev) ev.preventDefault();
      clearError();
      const label = btn.textContent;
      btn.disabled = true;
      if (busyLabel) btn.textContent = busyLabel;
      try { await fn(); } catch (e) { fail(e); } finally { btn.disabled = false; btn.textContent = label; }
    };
  }

  function findTerm(id) {
    for (const s of sessions.values()) {
      const t = s.terminals.find((x) => x.id === id);
      if (t) return t;
    }
    return null;
  }

  // --- rendering -----------------------------------------------------------
  function render() {
    const ul = $("sessions");
    const focusKey = document.activeElement && document.activeElement.dataset.key;
    ul.replaceChildren();
    $("no-sessions").hidden = sessions.size > 0;
    for (const [name, s] of sessions) {
      const li = el("li");
      const head = el("div", "sess");
      head.append(el("strong", null, name), el("span", "muted", s.session.status || ""));
      const shut = button("Shut down", "small danger", "s:" + name);
      shut.setAttribute("aria-label", "Shut down session " + name);
      shut.onclick = action(shut, async () => {
        if (!confirm("Shut down session " + name + " and all its agents?")) return;
        await api("DELETE", "/sessions/" + enc(name));
        sessions.delete(name);
        render();
      }, "Shutting down...");
      head.append(shut);
      const terms = el("ul", "terms");
      for (const t of s.terminals) {
        const tli = el("li", t.caller_id ? "worker" : "");
        const b = button("", "", "t:" + t.id);
        b.setAttribute("aria-pressed", String(t.id === selected));
        const who = (t.caller_id ? "\u21b3 " : "") + t.name + " (" + t.provider + ")";
        b.append(el("span", "who", who), setBadge(el("span"), t.status));
        b.onclick = () => select(t.id);
        tli.append(b);
        terms.append(tli);
      }
      li.append(head, terms);
      ul.append(li);
    }
    const f = focusKey && ul.querySelector('[data-key="' + CSS.escape(focusKey) + '"]');
    if (f) f.focus();
    renderDetail();
  }

  function renderDetail() {
    const t = findTerm(selected);
    $("no-term").hidden = !!t; $("term").hidden = !t;
    if (!t) return;
    $("t-title").textContent = t.name + " [" + t.id + "] " + t.agent_profile + " on " + t.provider +
      " in " + t.session_name + (t.caller_id ? ", called by " + t.caller_id : "");
    setBadge($("t-badge"), t.status);
  }

  function select(id) {
    if (id !== selected) {
      selected = id;
      $("t-screen").textContent = "loading...";
      $("t-last").textContent = "";
      $("no-term").textContent = "Select a terminal in the session list.";
    }
    render();
    refreshOutput();
  }

  function showScreen(text) {
    const pre = $("t-screen");
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 20;
    pre.textContent = text.replace(/\s+$/, "");
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  }

  // Screen and last answer of the selected terminal; re-armed every 2 s while processing.
  async function refreshOutput() {
    if (outBusy) { outAgain = true; return; }
    clearTimeout(outTimer); outTimer = null;
    const id = selected;
    if (!id) return;
    outBusy = true;
    try {
      const base = "/terminals/" + enc(id) + "/output?mode=";
      const [full, last] = await Promise.allSettled([api("GET", base + "full"), api("GET", base + "last")]);
      if (id !== selected) return;
      if (full.status === "fulfilled") showScreen(full.value.output);
      else $("t-screen").textContent = "(cannot read the screen: " + full.reason.message + ")";
      $("t-last").textContent = last.status === "fulfilled" ? last.value.output
        : last.reason.status === 404 ? "(no answer yet)" : "(error: " + last.reason.message + ")";
    } finally {
      outBusy = false;
      const t = findTerm(selected);
      if (outAgain) { outAgain = false; refreshOutput(); }
      else if (t && t.status === "processing") outTimer = setTimeout(refreshOutput, 2000);
    }
  }

  // --- state from the server -------------------------------------------------
  async function loadSession(name) {
    try { sessions.set(name, await api("GET", "/sessions/" + enc(name))); } catch (e) {
      if (e.status !== 404) throw e;
      sessions.delete(name);
    }
  }

  async function loadAll() {
    const list = await api("GET", "/sessions");
    const full = await Promise.all(list.map((s) => api("GET", "/sessions/" + enc(s.name))
      .catch((e) => { if (e.status === 404) return null; throw e; })));
    sessions.clear();
    for (const s of full) if (s) sessions.set(s.session.name, s);
  }

  let choicesLoaded = false;
  async function loadChoices() {
    const [profiles, providers] = await Promise.all([api("GET", "/agents/profiles"), api("GET", "/agents/providers")]);
    const option = (p, text) => Object.assign(el("option", null, text), { value: p.name, title: p.description || "" });
    $("c-profile").replaceChildren(...profiles.map((p) => option(p, p.name)));
    $("c-provider").replaceChildren(option({ name: "" }, "(profile default)"), ...providers.map((p) =>
      Object.assign(option(p, p.name + (p.installed ? "" : " (not installed)")), { disabled: !p.installed })));
    choicesLoaded = true;
  }

  async function applyEvents(events) {
    const reload = new Set();
    let refresh = false;
    for (const ev of events) {
      const s = sessions.get(ev.session_name);
      if (ev.kind === "session_created" || ev.kind === "terminal_created") {
        reload.add(ev.session_name);
      } else if (ev.kind === "session_deleted") {
        sessions.delete(ev.session_name);
      } else if (ev.kind === "terminal_deleted") {
        if (s) s.terminals = s.terminals.filter((t) => t.id !== ev.terminal_id);
        if (ev.terminal_id === selected) {
          selected = null;
          $("no-term").textContent = "Terminal " + ev.terminal_id + " was deleted.";
        }
      } else if (ev.kind === "status") {
        const t = findTerm(ev.terminal_id);
        if (t) t.status = ev.data.status;
        else if (ev.session_name) reload.add(ev.session_name);
        if (ev.terminal_id === selected) refresh = true;
      } else if (ev.kind === "input_failed") {
        fail(new Error("Input to terminal " + ev.terminal_id + " failed: " + (ev.data.reason || "")));
      }
    }
    await Promise.all([...reload].map(loadSession));
    render();
    if (refresh) refreshOutput();
  }

  function setConnected(ok, text) { $("banner").hidden = ok; $("conn").textContent = text; }

  // Long-poll /events forever; on failure back off 1, 2, 4, 8, 10, 10... s and resync.
  async function eventLoop() {
    let synced = false, backoff = 0;
    for (;;) {
      try {
        if (!synced) {
          cursor = (await api("GET", "/events")).next;
          await loadAll();
          if (!choicesLoaded) await loadChoices();
          synced = true;
          render();
          if (selected) refreshOutput();
        }
        setConnected(true, "live");
        backoff = 0;
        const ctl = new AbortController();
        const timer = setTimeout(() => ctl.abort(), 40000);
        let r;
        try { r = await api("GET", "/events?after=" + cursor + "&wait=25", undefined, ctl.signal); }
        finally { clearTimeout(timer); }
        if (r.next < cursor) { synced = false; continue; } // the server's history was reset
        cursor = r.next;
        if (r.events.length) await applyEvents(r.events);
      } catch (e) {
        synced = false;
        backoff = backoff ? Math.min(backoff * 2, 10) : 1;
        setConnected(false, "disconnected (" + (e.message || e) + "); retrying in " + backoff + " s");
        await sleep(backoff * 1000);
      }
    }
  }

  // --- forms and buttons -------------------------------------------------------
  function wire() {
    $("create").onsubmit = action($("create").querySelector("button"), async () => {
      const body = {}; // the fields' names are the API's; empty ones are left out
      for (const [key, value] of new FormData($("create"))) if (value.trim()) body[key] = value.trim();
      const t = await api("POST", "/sessions", body);
      await loadSession(t.session_name);
      $("c-name").value = "";
      select(t.id);
    }, "Creating...");

    $("t-input").onsubmit = action($("t-input").querySelector("button"), async () => {
      const id = selected, msg = $("t-msg").value;
      if (!msg.trim()) return;
      await api("POST", "/terminals/" + enc(id) + "/input", { message: msg });
      $("t-msg").value = "";
      refreshOutput();
    }, "Sending...");
    $("t-msg").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); $("t-input").requestSubmit(); }
    });

    $("t-key").onsubmit = action($("t-key").querySelector("button"), async () => {
      await api("POST", "/terminals/" + enc(selected) + "/key", { key: $("t-keyname").value.trim() });
      refreshOutput();
    });

    $("t-exit").onclick = action($("t-exit"), async () => {
      await api("POST", "/terminals/" + enc(selected) + "/exit");
      refreshOutput();
    });
    $("t-delete").onclick = action($("t-delete"), async () => {
      const id = selected;
      if (!confirm("Delete terminal " + id + "? Its agent is killed.")) return;
      await api("DELETE", "/terminals/" + enc(id));
      await applyEvents([{ kind: "terminal_deleted", terminal_id: id, session_name: (findTerm(id) || {}).session_name }]);
    });
    $("error-close").onclick = clearError;
  }

  wire();
  eventLoop();
})();
