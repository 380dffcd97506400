"use strict";
// The cao console: one page over cao-server's REST API, no build step.
// Live state comes from the /events long-poll and each visible terminal long-polls
// its own /screen route, so an idle fleet costs no requests and no timers.
// Sections: helpers, API, state, tree, terminal panes, panels, dialogs, keyboard, start.

// -- helpers ------------------------------------------------------------------

const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "class") node.className = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
}

const STATUS_TEXT = { waiting_user_answer: "waiting", unknown: "starting" };

function statusOf(term) { return term.status || "unknown"; }

function ago(iso) {
  if (!iso) return "never";
  const when = new Date(iso);  // the server's local time, as upstream writes it
  if (isNaN(when)) return iso;
  const s = Math.round((Date.now() - when) / 1000);
  if (Math.abs(s) < 60) return s >= 0 ? `${s}s ago` : `in ${-s}s`;
  const m = Math.round(s / 60);
  if (Math.abs(m) < 90) return m >= 0 ? `${m}m ago` : `in ${-m}m`;
  return when.toLocaleString();
}

function toast(text, kind = "info") {
  const close = el("button", { class: "small", type: "button", "aria-label": "Dismiss" }, "\u00d7");
  const item = el("div", { class: `toast ${kind}`, role: kind === "error" ? "alert" : "status" },
    el("p", {}, text), close);
  close.addEventListener("click", () => item.remove());
  $("#toasts").append(item);
  setTimeout(() => item.remove(), kind === "error" ? 15000 : 5000);
  while ($("#toasts").children.length > 5) $("#toasts").firstChild.remove();
}

// Runs an action from a button: the button is disabled meanwhile and a failure is shown.
async function act(button, action, done) {
  if (button) button.disabled = true;
  try {
    const result = await action();
    if (done) toast(done);
    return result;
  } catch (err) {
    toast(err.message, "error");
    return undefined;
  } finally {
    if (button) button.disabled = false;
  }
}

// -- API ----------------------------------------------------------------------

class Unreachable extends Error {}
class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

async function api(method, path, body, signal) {
  const init = { method, signal, headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new Unreachable("cao-server is unreachable");
  }
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!res.ok) {
    const detail = data && data.detail ? data.detail : `${res.status} ${res.statusText}`;
    throw new ApiError(`${method} ${path.split("?")[0]}: ${detail}`, res.status);
  }
  return data;
}

const q = encodeURIComponent;

// -- state --------------------------------------------------------------------

const state = {
  sessions: [],
  terminals: new Map(),   // id -> terminal JSON
  profiles: [],
  providers: [],
  selected: null,         // terminal id selected in the tree
  panes: new Map(),       // id -> Pane, in tab order
  current: null,          // id of the tab in front
  split: false,
  panel: "approvals",
  approvals: [],
  online: false,
  seq: null,              // last event seen
};

const onlineWaiters = [];
function whenOnline() {
  return state.online ? Promise.resolve() : new Promise((resolve) => onlineWaiters.push(resolve));
}

function setOnline(online, retryMs) {
  const conn = $("#conn");
  const banner = $("#banner");
  if (online) {
    conn.dataset.state = "live";
    conn.textContent = "live";
    banner.hidden = true;
    state.online = true;
    onlineWaiters.splice(0).forEach((resolve) => resolve());
    return;
  }
  state.online = false;
  conn.dataset.state = "down";
  conn.textContent = "offline";
  banner.hidden = false;
  banner.textContent = `cao-server at ${location.host} is unreachable. Start it with "cao-server"; ` +
    `this page reconnects by itself (next try in ${Math.round(retryMs / 100) / 10} s).`;
}

function profileRole(name) {
  const profile = state.profiles.find((p) => p.name === name);
  return profile && profile.role ? profile.role : null;
}

function currentTerminal() {
  return state.current || state.selected;
}

function sessionOfCurrent() {
  const term = state.terminals.get(currentTerminal());
  return term ? term.session_name : (state.sessions[0] && state.sessions[0].name);
}

async function refreshFleet() {
  const [sessions, terminals] = await Promise.all([api("GET", "/sessions"), api("GET", "/terminals")]);
  state.sessions = sessions;
  state.terminals = new Map(terminals.map((t) => [t.id, t]));
  for (const id of [...state.panes.keys()]) {
    if (!state.terminals.has(id)) closeTab(id, "deleted");
  }
  if (state.selected && !state.terminals.has(state.selected)) state.selected = null;
  renderTree();
  renderTabs();
  renderCounts();
}

async function refreshCatalog() {
  const [profiles, providers] = await Promise.all([
    api("GET", "/agents/profiles"), api("GET", "/agents/providers")]);
  state.profiles = profiles;
  state.providers = providers;
  renderTree();
}

async function refreshAll() {
  await Promise.all([refreshFleet(), refreshCatalog(), refreshApprovals()]);
  await loadPanel(state.panel);
}

let fleetTimer = null;
function refreshFleetSoon() {
  // Events come in bursts (a session brings a terminal and a status): one fetch for all.
  if (fleetTimer) return;
  fleetTimer = setTimeout(() => {
    fleetTimer = null;
    refreshFleet().catch((err) => toast(err.message, "error"));
  }, 40);
}

// -- events -------------------------------------------------------------------

const FLEET_EVENTS = new Set(["session_created", "session_deleted", "terminal_created",
  "terminal_deleted", "description_changed"]);

function applyEvent(event) {
  logEvent(event);
  const kind = event.kind;
  if (FLEET_EVENTS.has(kind)) refreshFleetSoon();
  if (kind === "status") {
    const term = state.terminals.get(event.terminal_id);
    if (term) {
      term.status = event.data.status;
      renderTree();
      renderTabs();
      renderCounts();
      const pane = state.panes.get(term.id);
      if (pane) pane.renderHead();
    } else {
      refreshFleetSoon();
    }
    if (event.data.status === "waiting_user_answer" || event.data.previous === "waiting_user_answer") {
      refreshApprovals().catch((err) => toast(err.message, "error"));
    }
  }
  if (kind.startsWith("message_") && state.panel === "inbox" && event.terminal_id === inboxTarget()) {
    loadPanel("inbox");
  }
  if (kind.startsWith("flow") && state.panel === "flows") loadPanel("flows");
  if (kind.startsWith("memory") && state.panel === "memory") loadPanel("memory");
}

async function followEvents() {
  let backoff = 500;
  for (;;) {
    try {
      const wait = state.seq === null ? 0 : 25;
      const after = state.seq === null ? "" : `&after=${state.seq}`;
      const reply = await api("GET", `/events?wait=${wait}${after}`);
      const reconnected = !state.online;
      const first = state.seq === null;
      state.seq = reply.next;
      if (reconnected) {
        await refreshAll();  // "live" only once the page shows what the server has
        setOnline(true);
        if (!first) toast("Reconnected to cao-server");
      }
      reply.events.forEach(applyEvent);
      backoff = 500;
    } catch (err) {
      if (err instanceof Unreachable || (err.status && err.status >= 500)) {
        setOnline(false, backoff);
        await sleep(backoff);
        backoff = Math.min(backoff * 2, 4000);
      } else {
        toast(err.message, "error");
        state.seq = null;  // the server forgot our place (a new home): start again
        await sleep(1000);
      }
    }
  }
}

// -- the session tree ---------------------------------------------------------

let treeOrder = [];

function renderTree() {
  const tree = $("#tree");
  treeOrder = [];
  const nodes = state.sessions.map((session) => {
    const terms = [...state.terminals.values()].filter((t) => t.session_name === session.name);
    const ids = new Set(terms.map((t) => t.id));
    const childrenOf = (caller) => terms.filter((t) =>
      caller === null ? !t.caller_id || !ids.has(t.caller_id) : t.caller_id === caller);
    const branch = (caller) => {
      const items = childrenOf(caller).map((t) => {
        treeOrder.push(t.id);
        const kids = branch(t.id);
        return el("li", { role: "none" }, terminalNode(t), kids.length ? el("ul", { role: "group" }, kids) : null);
      });
      return items;
    };
    const shutdown = el("button", {
      class: "small danger", type: "button", title: "Shut down this session",
      "aria-label": `Shut down ${session.name}`,
      onclick: (e) => { e.stopPropagation(); shutdownSession(session.name, e.currentTarget); },
    }, "\u00d7");
    const addWorker = el("button", {
      class: "small", type: "button", title: "Add a worker (w)", "aria-label": `Add a worker to ${session.name}`,
      onclick: (e) => { e.stopPropagation(); openWorkerDialog(session.name); },
    }, "+");
    return el("li", { class: "sess", role: "treeitem", "aria-expanded": "true", "data-session": session.name },
      el("div", { class: "sess-head" }, el("strong", {}, session.name), addWorker, shutdown),
      el("ul", { role: "group" }, branch(null)));
  });
  tree.replaceChildren(...nodes);
  $("#tree-empty").hidden = state.sessions.length > 0;
}

function terminalNode(term) {
  const status = statusOf(term);
  const role = profileRole(term.agent_profile);
  const caller = term.caller_id && state.terminals.get(term.caller_id);
  const sub = [term.agent_profile, term.provider, role && `role ${role}`,
    caller ? `from ${caller.name}` : term.caller_id ? `from ${term.caller_id}` : null,
    term.description].filter(Boolean).join(" \u00b7 ");
  return el("div", {
    class: `node s-${status}`, role: "treeitem", "data-id": term.id,
    "aria-selected": String(state.selected === term.id),
    title: `${term.name} (${term.id}) in ${term.working_directory}`,
    onclick: () => { select(term.id); openTab(term.id); },
  }, el("span", { class: "dot", "aria-hidden": "true" }),
  el("span", { class: "name" }, term.name),
  el("span", { class: "st" }, STATUS_TEXT[status] || status),
  el("span", { class: "sub" }, sub));
}

function renderCounts() {
  const terms = [...state.terminals.values()];
  const busy = terms.filter((t) => t.status === "processing").length;
  const waiting = terms.filter((t) => t.status === "waiting_user_answer").length;
  const parts = [`${state.sessions.length} session${state.sessions.length === 1 ? "" : "s"}`,
    `${terms.length} agent${terms.length === 1 ? "" : "s"}`, `${busy} processing`];
  if (waiting) parts.push(`${waiting} waiting`);
  $("#counts").textContent = parts.join(" \u00b7 ");
}

function select(id) {
  state.selected = id;
  for (const node of $$(".node", $("#tree"))) node.setAttribute("aria-selected", String(node.dataset.id === id));
  const node = $(`.node[data-id="${id}"]`);
  if (node) node.scrollIntoView({ block: "nearest" });
  if (state.panel === "inbox") loadPanel("inbox");
}

function moveSelection(step) {
  if (!treeOrder.length) return;
  const at = treeOrder.indexOf(state.selected);
  const next = at < 0 ? 0 : Math.max(0, Math.min(treeOrder.length - 1, at + step));
  select(treeOrder[next]);
}

// -- terminal panes -----------------------------------------------------------

const XTERM_THEME = { background: "#0f131a", foreground: "#dde3ec", cursor: "#dde3ec" };

class Pane {
  constructor(id) {
    this.id = id;
    this.etag = null;
    this.visible = false;
    this.isGone = false;
    this.sending = Promise.resolve();
    this.screenBox = el("div", { class: "screen", "aria-label": "terminal screen" });
    this.head = el("div", { class: "pane-head" });
    this.root = el("section", { class: "pane", "data-id": id }, this.head, this.screenBox);
    this.root.addEventListener("mousedown", () => setCurrent(id));
    this.term = new window.Terminal({
      cols: 80, rows: 24, scrollback: 0, fontSize: state.split ? 10 : 12, cursorBlink: false,
      fontFamily: 'ui-monospace, "SFMono-Regular", Menlo, monospace', theme: XTERM_THEME,
    });
    this.term.open(this.screenBox);
    this.term.onData((data) => this.type(data));
    this.term.attachCustomKeyEventHandler((e) => {
      if (e.type === "keydown" && e.ctrlKey && e.key === "]") {
        this.term.blur();
        return false;
      }
      return true;
    });
    this.term.textarea.addEventListener("focus", () => this.screenBox.classList.add("typing"));
    this.term.textarea.addEventListener("blur", () => this.screenBox.classList.remove("typing"));
    this.renderHead();
  }

  get info() { return state.terminals.get(this.id); }

  renderHead() {
    const term = this.info;
    if (!term) return;
    const status = statusOf(term);
    const button = (label, title, action, optional) => el("button", {
      class: optional ? "small optional" : "small", type: "button", title, onclick: action }, label);
    this.head.replaceChildren(
      el("span", { class: `node s-${status}`, style: "display:contents" },
        el("span", { class: "dot", "aria-hidden": "true" }),
        el("span", { class: "title" }, term.name),
        el("span", { class: "st" }, STATUS_TEXT[status] || status)),
      el("span", { class: "meta optional", title: term.working_directory },
        `${term.provider} \u00b7 ${term.agent_profile} \u00b7 ${term.session_name} \u00b7 ${term.id}`),
      button("Type", "Type into the agent (t); Ctrl+] stops", () => this.focus(), true),
      button("Message", "Queue a message to its inbox (m)", () => { setCurrent(this.id); showPanel("inbox", true); }, true),
      button("Exit", "Ask the agent to exit (x)", (e) => exitTerminal(this.id, e.currentTarget)),
      el("button", { class: "small danger", type: "button", title: "Delete this terminal (Delete)",
        onclick: (e) => deleteTerminal(this.id, e.currentTarget) }, "Delete"));
  }

  focus() {
    setCurrent(this.id);
    this.term.focus();
  }

  setVisible(visible) {
    this.root.hidden = !visible;
    this.visible = visible;
  }

  draw(screen) {
    const [cols, rows] = screen.size;
    if (this.term.cols !== cols || this.term.rows !== rows) this.term.resize(cols, rows);
    const [x, y] = screen.cursor;
    const lines = screen.screen.split("\n").slice(0, rows);
    this.etag = screen.etag;
    this.term.write(`\x1b[0m\x1b[H\x1b[2J${lines.join("\r\n")}\x1b[0m\x1b[${y + 1};${x + 1}H`);
  }

  type(data) {
    // One request at a time, in order, so keys reach the agent as they were typed.
    this.sending = this.sending.then(() => api("POST", `/terminals/${this.id}/keys`, { data }))
      .catch((err) => toast(err.message, "error"));
  }

  gone(text) {
    this.isGone = true;
    this.screenBox.replaceChildren(el("p", { class: "gone" }, text));
  }

  dispose() {
    this.visible = false;
    this.term.dispose();
    this.root.remove();
  }
}

// One long-poll follows every terminal on screen: a browser keeps at most six
// connections to a server, so a request per terminal would stall the rest.
const screenFeed = {
  controller: null,

  restart() {
    if (this.controller) this.controller.abort();
    this.controller = null;
    const panes = [...state.panes.values()].filter((pane) => pane.visible && !pane.isGone);
    if (panes.length) this.follow(panes);
  },

  async follow(panes) {
    const controller = this.controller = new AbortController();
    while (this.controller === controller) {
      const query = panes.map((p) => `terminal=${p.id}${p.etag ? `:${p.etag}` : ""}`).join("&");
      try {
        const reply = await api("GET", `/screens?wait=25&${query}`, undefined, controller.signal);
        for (const screen of reply.screens) {
          const pane = state.panes.get(screen.terminal_id);
          if (pane && screen.gone) pane.gone("This terminal no longer exists.");
          else if (pane) pane.draw(screen);
        }
        if (reply.screens.some((screen) => screen.gone)) {
          this.restart();
          return;
        }
      } catch (err) {
        if (err.name === "AbortError") return;
        if (err instanceof Unreachable) await whenOnline();
        else await sleep(1000);
      }
    }
  },
};

function openTab(id) {
  if (!state.terminals.has(id)) return;
  if (!state.panes.has(id)) {
    const pane = new Pane(id);
    state.panes.set(id, pane);
    $("#panes").append(pane.root);
  }
  setCurrent(id);
}

function closeTab(id, reason) {
  const pane = state.panes.get(id);
  if (!pane) return;
  pane.dispose();
  state.panes.delete(id);
  if (reason === "deleted") toast(`Terminal ${id} was deleted; its tab is closed`);
  if (state.current === id) state.current = [...state.panes.keys()].pop() || null;
  layoutPanes();
}

function setCurrent(id) {
  if (state.current === id) return;
  state.current = id;
  if (id) select(id);
  layoutPanes();
  if (state.panel === "inbox") loadPanel("inbox");
}

function layoutPanes() {
  const panes = $("#panes");
  panes.classList.toggle("split", state.split);
  for (const [id, pane] of state.panes) {
    pane.setVisible(state.split || id === state.current);
    pane.root.classList.toggle("current", id === state.current);
    pane.term.options.fontSize = state.split ? 10 : 12;
  }
  screenFeed.restart();
  $("#panes-empty").hidden = state.panes.size > 0;
  $("#layout-btn").textContent = state.split ? "Tabs" : "Side by side";
  renderTabs();
}

function renderTabs() {
  const tabs = [...state.panes.keys()].map((id, index) => {
    const term = state.terminals.get(id);
    const status = term ? statusOf(term) : "error";
    return el("div", { class: `tab node s-${status}`, role: "tab", "aria-selected": String(id === state.current),
      title: index < 9 ? `${term ? term.name : id} (${index + 1})` : undefined,
      onclick: () => setCurrent(id) },
    el("span", { class: "dot", "aria-hidden": "true" }),
    el("span", {}, term ? term.name : id),
    el("button", { class: "close", type: "button", "aria-label": `Close tab ${term ? term.name : id}`,
      onclick: (e) => { e.stopPropagation(); closeTab(id); } }, "\u00d7"));
  });
  $("#tabs").replaceChildren(...tabs);
}

function cycleTab(step) {
  const ids = [...state.panes.keys()];
  if (!ids.length) return;
  const at = ids.indexOf(state.current);
  setCurrent(ids[(at + step + ids.length) % ids.length]);
}

async function exitTerminal(id, button) {
  await act(button, () => api("POST", `/terminals/${id}/exit`), "Asked the agent to exit");
}

async function deleteTerminal(id, button) {
  const term = state.terminals.get(id);
  if (!await confirmBox(`Delete terminal ${term ? term.name : id}? Its agent is stopped and its window closed.`, "Delete")) return;
  await act(button, () => api("DELETE", `/terminals/${id}`), "Terminal deleted");
  refreshFleetSoon();
}

async function shutdownSession(name, button) {
  if (!await confirmBox(`Shut down session ${name}? Every agent in it is stopped.`, "Shut down")) return;
  await act(button, () => api("DELETE", `/sessions/${q(name)}`), `Session ${name} shut down`);
  refreshFleetSoon();
}

// -- side panels --------------------------------------------------------------

function showPanel(name, focus) {
  state.panel = name;
  for (const tab of $$(".side-tabs [data-panel]")) tab.setAttribute("aria-selected", String(tab.dataset.panel === name));
  for (const panel of $$(".side .panel")) panel.hidden = panel.id !== `panel-${name}`;
  loadPanel(name);
  if (focus && name === "inbox") $("#inbox-msg").focus();
}

async function loadPanel(name) {
  const loader = PANELS[name];
  if (!loader) return;
  try {
    await loader();
  } catch (err) {
    if (!(err instanceof Unreachable)) toast(err.message, "error");
  }
}

function inboxTarget() {
  return currentTerminal();
}

async function refreshApprovals() {
  state.approvals = await api("GET", "/approvals");
  const count = state.approvals.length;
  $("#approvals-count").textContent = String(count);
  $("#approvals-btn").hidden = count === 0;
  renderApprovals();
}

function answerChoices(question) {
  const choices = [];
  if (/\[y\/n\]|\(y\/n\)|yes\/no/i.test(question)) choices.push(["y", "Yes"], ["n", "No"]);
  for (const m of question.matchAll(/^\s*(?:[\u276f>\u203a]\s*)?(\d)[.)]\s+(.{1,40})/gm)) choices.push([m[1], `${m[1]}. ${m[2].trim()}`]);
  return choices;
}

function renderApprovals() {
  const list = $("#approvals");
  list.replaceChildren(...state.approvals.map((term) => {
    const answer = async (value, button) => {
      await act(button, () => api("POST", `/terminals/${term.id}/answer`, { answer: value }),
        `Answered ${term.name}: ${value}`);
      refreshApprovals().catch(() => {});
    };
    const text = el("input", { "aria-label": `Answer for ${term.name}`, placeholder: "Other answer", autocomplete: "off" });
    const form = el("form", { class: "row", onsubmit: (e) => { e.preventDefault(); if (text.value.trim()) answer(text.value, e.submitter); } },
      answerChoices(term.question).map(([value, label]) => el("button", { type: "button", class: "small",
        onclick: (e) => answer(value, e.currentTarget) }, label)),
      text, el("button", { type: "submit", class: "small" }, "Send"));
    return el("li", { class: "card waiting", "data-id": term.id },
      el("div", { class: "head" }, el("b", {}, term.name), el("span", { class: "tag" }, term.provider),
        el("button", { class: "small", type: "button", onclick: () => { select(term.id); openTab(term.id); } }, "Open")),
      el("pre", {}, term.question), form);
  }));
  $("#approvals-empty").hidden = state.approvals.length > 0;
}

async function loadInbox() {
  const id = inboxTarget();
  const term = state.terminals.get(id);
  $("#inbox-target").textContent = term ? term.name : "the selected terminal";
  $("#inbox-form button").disabled = !term;
  if (!term) {
    $("#inbox").replaceChildren();
    $("#inbox-empty").hidden = false;
    return;
  }
  const messages = await api("GET", `/terminals/${id}/inbox/messages?limit=50`);
  if (id !== inboxTarget()) return;
  $("#inbox").replaceChildren(...messages.map((m) => el("li", { class: "card" },
    el("div", { class: "head" }, el("b", {}, `from ${m.sender_id}`), el("span", { class: `tag ${m.status}` }, m.status),
      el("span", { class: "muted" }, ago(m.delivered_at || m.created_at))),
    el("p", {}, m.message), m.reason ? el("p", { class: "muted" }, m.reason) : null)));
  $("#inbox-empty").hidden = messages.length > 0;
}

async function loadFlows() {
  const flows = await api("GET", "/flows");
  $("#flows").replaceChildren(...flows.map((f) => {
    const run = el("button", { class: "small", type: "button", disabled: f.running,
      onclick: async (e) => { await act(e.currentTarget, () => api("POST", `/flows/${q(f.name)}/run`), `Flow ${f.name} ran`); loadPanel("flows"); } },
    f.running ? "Running\u2026" : "Run now");
    const toggle = el("button", { class: "small", type: "button",
      onclick: async (e) => { await act(e.currentTarget, () => api("POST", `/flows/${q(f.name)}/${f.enabled ? "disable" : "enable"}`)); loadPanel("flows"); } },
    f.enabled ? "Disable" : "Enable");
    const last = f.last_run ? `${ago(f.last_run)}: ${f.last_result || "?"}${f.last_reason ? ` (${f.last_reason})` : ""}` : "never";
    return el("li", { class: "card", "data-flow": f.name },
      el("div", { class: "head" }, el("b", {}, f.name), el("span", { class: `tag ${f.enabled ? "yes" : "no"}` }, f.enabled ? "enabled" : "disabled")),
      el("p", {}, el("code", {}, f.schedule), ` runs ${f.agent_profile}${f.provider ? ` on ${f.provider}` : ""}`),
      el("p", { class: "muted" }, `Last: ${last}. Next: ${f.enabled && f.next_run ? ago(f.next_run) : "\u2014"}`),
      el("div", { class: "row" }, run, toggle));
  }));
  $("#flows-empty").hidden = flows.length > 0;
}

async function loadAgents() {
  await refreshCatalog();
  $("#profiles").replaceChildren(...state.profiles.map((p) => el("li", { class: "card", "data-name": p.name },
    el("div", { class: "head" }, el("b", {}, p.name), p.role ? el("span", { class: "tag" }, `role ${p.role}`) : null,
      el("span", { class: "tag" }, p.source),
      el("button", { class: "small", type: "button", onclick: () => openLaunchDialog(p.name) }, "Launch")),
    el("p", { class: "muted" }, p.error ? `Error: ${p.error}` : p.description))));
  $("#providers").replaceChildren(...state.providers.map((p) => el("tr", { "data-name": p.name },
    el("td", {}, p.name), el("td", {}, el("code", {}, p.binary)),
    el("td", {}, el("span", { class: `tag ${p.installed ? "yes" : "no"}` }, p.installed ? "installed" : "not installed")))));
}

async function loadSkills() {
  const skills = await api("GET", "/skills");
  $("#skills").replaceChildren(...skills.map((s) => el("li", { class: "card", "data-name": s.name },
    el("div", { class: "head" }, el("b", {}, s.name), el("span", { class: "tag" }, s.source),
      el("button", { class: "small", type: "button", onclick: (e) => showSkill(s.name, e.currentTarget) }, "View")),
    el("p", { class: "muted" }, s.description))));
  $("#skills-empty").hidden = skills.length > 0;
}

async function showSkill(name, button) {
  const skill = await act(button, () => api("GET", `/skills/${q(name)}`));
  if (!skill) return;
  $("#skill-h").textContent = skill.name;
  $("#skill-body").textContent = skill.content || "";
  $("#skill-dialog").showModal();
}

let memories = [];
async function loadMemory() {
  try {
    memories = await api("GET", "/memory?limit=500");
  } catch (err) {
    if (err.status === 409) {  // memory is turned off in settings.json
      memories = [];
      $("#memory-empty").textContent = err.message.replace(/^[A-Z]+ \S+: /, "");
    } else throw err;
  }
  renderMemory();
}

function renderMemory() {
  const filter = $("#memory-filter").value.trim().toLowerCase();
  const shown = memories.filter((m) => !filter || `${m.key} ${m.content}`.toLowerCase().includes(filter));
  $("#memory").replaceChildren(...shown.map((m) => {
    const scopeQuery = `?scope=${q(m.scope)}${m.scope_id ? `&scope_id=${q(m.scope_id)}` : ""}`;
    return el("li", { class: "card" },
      el("div", { class: "head" }, el("b", {}, m.key), el("span", { class: "tag" }, m.scope),
        m.type ? el("span", { class: "tag" }, m.type) : null,
        el("button", { class: "small danger", type: "button", "aria-label": `Forget ${m.key}`,
          onclick: async (e) => {
            if (!await confirmBox(`Forget memory ${m.key} (${m.scope})?`, "Forget")) return;
            await act(e.currentTarget, () => api("DELETE", `/memory/${q(m.key)}${scopeQuery}`), `Forgot ${m.key}`);
            loadPanel("memory");
          } }, "Forget")),
      el("p", {}, m.content),
      el("p", { class: "muted" }, `${m.scope_id || ""} ${ago(m.updated_at || m.created_at)}`));
  }));
  $("#memory-empty").hidden = shown.length > 0;
}

async function loadPlugins() {
  const info = await api("GET", "/plugins");
  const items = [...info.plugins.map((p) => el("li", { class: "card" },
    el("div", { class: "head" }, el("b", {}, p.name), p.format ? el("span", { class: "tag" }, p.format) : null),
    el("p", { class: "muted" }, Object.entries(p).filter(([k]) => !["name", "format"].includes(k))
      .map(([k, v]) => `${k}: ${Array.isArray(v) ? v.join(", ") : v}`).join(" \u00b7 ")))),
  ...info.problems.map((text) => el("li", { class: "card" }, el("p", { class: "tag error" }, String(text))))];
  $("#plugins").replaceChildren(...items);
  $("#plugins-empty").hidden = items.length > 0;
}

function logEvent(event) {
  const list = $("#events");
  const when = new Date(event.ts * 1000).toLocaleTimeString();
  const term = event.terminal_id && state.terminals.get(event.terminal_id);
  const who = term ? term.name : event.terminal_id || event.session_name || "";
  const data = Object.entries(event.data || {}).map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
  list.prepend(el("li", {}, `${when} `, el("b", {}, event.kind), ` ${who} ${data}`));
  while (list.children.length > 200) list.lastChild.remove();
}

const PANELS = {
  approvals: refreshApprovals, inbox: loadInbox, flows: loadFlows, agents: loadAgents,
  skills: loadSkills, memory: loadMemory, plugins: loadPlugins, events: async () => {},
};

// -- dialogs ------------------------------------------------------------------

function confirmBox(text, okLabel) {
  const dialog = $("#confirm-dialog");
  $("#confirm-text").textContent = text;
  $("#confirm-ok").textContent = okLabel;
  dialog.returnValue = "";
  dialog.showModal();
  $("#confirm-ok").focus();
  return new Promise((resolve) => dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true }));
}

function fillAgentSelects(form, profile) {
  const profiles = form.elements.agent_profile;
  profiles.replaceChildren(...state.profiles.map((p) => el("option", { value: p.name, selected: p.name === profile },
    p.role ? `${p.name} (${p.role})` : p.name)));
  form.elements.provider.replaceChildren(el("option", { value: "" }, "profile's default"),
    ...state.providers.map((p) => el("option", { value: p.name }, p.installed ? p.name : `${p.name} (not installed)`)));
}

// A dialog form whose OK runs `submit`; the dialog stays open, showing the error, if it fails.
function bindDialog(dialog, form, submit) {
  form.addEventListener("submit", async (e) => {
    if (!e.submitter || e.submitter.value !== "ok") return;
    e.preventDefault();
    const ok = await act(e.submitter, () => submit(new FormData(form)));
    if (ok !== undefined) dialog.close("ok");
  });
}

async function ensureCatalog() {
  if (!state.profiles.length) await refreshCatalog();
}

async function openLaunchDialog(profile) {
  if (!await act(null, async () => { await ensureCatalog(); return true; })) return;
  const dialog = $("#launch-dialog");
  const form = $("#launch-form");
  form.reset();
  fillAgentSelects(form, profile);
  dialog.showModal();
  form.elements.agent_profile.focus();
}

async function launch(data) {
  const body = { agent_profile: data.get("agent_profile") };
  for (const name of ["provider", "session_name", "working_directory", "initial_message"]) {
    if (data.get(name).trim()) body[name] = data.get(name).trim();
  }
  const term = await api("POST", "/sessions", body);
  toast(`Launched ${term.name} in ${term.session_name}`);
  state.terminals.set(term.id, term);
  await refreshFleet();
  select(term.id);
  openTab(term.id);
  return term;
}

let workerSession = null;
async function openWorkerDialog(session) {
  workerSession = session || sessionOfCurrent();
  if (!workerSession) { toast("Launch a session first (n)", "error"); return; }
  if (!await act(null, async () => { await ensureCatalog(); return true; })) return;
  const caller = state.terminals.get(currentTerminal());
  const reportsTo = caller && caller.session_name === workerSession ? caller
    : [...state.terminals.values()].find((t) => t.session_name === workerSession);
  const form = $("#worker-form");
  form.reset();
  fillAgentSelects(form, "developer");
  form.dataset.caller = reportsTo ? reportsTo.id : "";
  $("#worker-session").textContent = workerSession;
  $("#worker-caller").textContent = reportsTo ? reportsTo.name : "nobody";
  form.elements.report.disabled = !reportsTo;
  $("#worker-dialog").showModal();
  form.elements.agent_profile.focus();
}

async function addWorker(data) {
  const form = $("#worker-form");
  const body = { agent_profile: data.get("agent_profile") };
  if (data.get("provider")) body.provider = data.get("provider");
  if (data.get("initial_message").trim()) body.initial_message = data.get("initial_message").trim();
  if (data.get("report") && form.dataset.caller) body.caller_id = form.dataset.caller;
  const term = await api("POST", `/sessions/${q(workerSession)}/terminals`, body);
  toast(`Added ${term.name} to ${workerSession}`);
  state.terminals.set(term.id, term);
  await refreshFleet();
  openTab(term.id);
  return term;
}

async function queueMessage(e) {
  e.preventDefault();
  const id = inboxTarget();
  const box = $("#inbox-msg");
  if (!id || !box.value.trim()) return;
  const done = await act($("#inbox-form button"), () => api("POST", `/terminals/${id}/inbox/messages`,
    { sender_id: "dashboard", message: box.value }), "Message queued");
  if (done) { box.value = ""; loadPanel("inbox"); }
}

// -- keyboard -----------------------------------------------------------------

const KEYS = {
  "?": () => $("#help-dialog").showModal(),
  n: () => openLaunchDialog(),
  w: () => openWorkerDialog(),
  D: () => { const s = sessionOfCurrent(); if (s) shutdownSession(s); },
  j: () => moveSelection(1), ArrowDown: () => moveSelection(1),
  k: () => moveSelection(-1), ArrowUp: () => moveSelection(-1),
  Enter: () => { if (state.selected) openTab(state.selected); },
  t: () => { const pane = state.panes.get(state.current); if (pane) pane.focus(); },
  m: () => showPanel("inbox", true),
  c: () => { if (state.current) closeTab(state.current); },
  "\\": () => { state.split = !state.split; layoutPanes(); },
  "[": () => cycleTab(-1), "]": () => cycleTab(1),
  x: () => { if (state.current) exitTerminal(state.current); },
  Delete: () => { if (currentTerminal()) deleteTerminal(currentTerminal()); },
  a: () => showPanel("approvals"), i: () => showPanel("inbox"), f: () => showPanel("flows"),
  p: () => showPanel("agents"), s: () => showPanel("skills"), r: () => showPanel("memory"),
  u: () => showPanel("plugins"), e: () => showPanel("events"),
};

function onKey(e) {
  if (e.defaultPrevented || e.ctrlKey || e.metaKey || e.altKey || e.isComposing) return;
  const target = e.target;
  if (target.closest(".xterm") || target.matches("input, textarea, select") || $("dialog[open]")) return;
  if (/^[1-9]$/.test(e.key)) {
    const id = [...state.panes.keys()][Number(e.key) - 1];
    if (id) setCurrent(id);
    e.preventDefault();
    return;
  }
  const action = KEYS[e.key];
  if (!action) return;
  if (e.key === "Enter" && target.matches("button, a")) return;
  e.preventDefault();
  action();
}

// -- start --------------------------------------------------------------------

function start() {
  if (!window.Terminal) {
    toast("The terminal library (vendor/xterm-6.0.0.js) did not load; screens cannot be shown", "error");
    return;
  }
  document.addEventListener("keydown", onKey);
  $("#new-session-btn").addEventListener("click", () => openLaunchDialog());
  $("#help-btn").addEventListener("click", () => $("#help-dialog").showModal());
  $("#approvals-btn").addEventListener("click", () => showPanel("approvals"));
  $("#layout-btn").addEventListener("click", () => { state.split = !state.split; layoutPanes(); });
  for (const tab of $$(".side-tabs [data-panel]")) tab.addEventListener("click", () => showPanel(tab.dataset.panel));
  bindDialog($("#launch-dialog"), $("#launch-form"), launch);
  bindDialog($("#worker-dialog"), $("#worker-form"), addWorker);
  $("#inbox-form").addEventListener("submit", queueMessage);
  $("#inbox-msg").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("#inbox-form").requestSubmit();
  });
  $("#memory-filter").addEventListener("input", renderMemory);
  showPanel("approvals");
  layoutPanes();
  followEvents();
}

start();
