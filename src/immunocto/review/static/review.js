// immunocto review page: keyboard-first labelling of the cells of one batch.
// Data from the server is only ever put into the page with textContent (never as HTML).
"use strict";

const KEYS = { "1": "cd4_t", "2": "cd8_t", "3": "b_cell", "4": "macrophage", "5": "other", "x": "not_cell", "u": "ambiguous" };
const COLS = 6;
const state = { token: sessionStorage.getItem("immunocto-token"), me: null, items: [], current: 0, decided: {}, undo: [], showIF: false, showContext: false, channels: [], strategy: null };

function el(tag, props = {}, text = "") {
  const node = document.createElement(tag);
  Object.assign(node, props);
  if (text) node.textContent = text;
  return node;
}

async function api(path, options = {}) {
  const headers = Object.assign({ "Authorization": "Bearer " + state.token }, options.body ? { "Content-Type": "application/json" } : {});
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) { showLogin("token refused; log in again"); throw new Error("401"); }
  if (!response.ok) { throw new Error(path + ": " + response.status + " " + (await response.text())); }
  return response.json();
}

function setStatus(text) { document.getElementById("status").textContent = text; }

function showLogin(message = "") {
  document.getElementById("app").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message;
}

async function login(token) {
  const response = await fetch("/api/login", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ token }) });
  if (!response.ok) { showLogin("unknown token"); return false; }
  state.token = token;
  sessionStorage.setItem("immunocto-token", token);
  return true;
}

async function start() {
  state.me = await api("/api/me");
  document.getElementById("login").hidden = true;
  document.getElementById("app").hidden = false;
  document.getElementById("who").textContent = state.me.reviewer;
  document.getElementById("blind-flag").hidden = !state.me.blind;
  const select = document.getElementById("strategy");
  select.replaceChildren(...state.me.strategies.map(s => el("option", { value: s, selected: s === state.me.strategy }, s)));
  state.strategy = state.me.strategy;
  select.onchange = () => { state.strategy = select.value; select.blur(); loadBatch(); };
  const box = document.getElementById("channels");
  box.hidden = state.me.markers.length === 0;
  state.channels = state.me.markers.filter(m => ["Hoechst", "CD3e", "CD20", "CD68", "CD8a", "CD4"].includes(m));
  for (const m of state.me.markers) {
    const input = el("input", { type: "checkbox", checked: state.channels.includes(m), value: m });
    input.onchange = () => { state.channels = [...box.querySelectorAll("input:checked")].map(i => i.value); input.blur(); render(); };
    const label = el("label");
    label.append(input, document.createTextNode(" " + m + " "));
    box.append(label);
  }
  await loadBatch();
}

function progress(done, total) {
  const bar = document.getElementById("progress");
  bar.max = Math.max(total, 1);
  bar.value = done;
  document.getElementById("progress-text").textContent = done + " / " + total;
}

async function loadBatch() {
  const batch = await api("/api/batch?strategy=" + encodeURIComponent(state.strategy));
  state.items = batch.items;
  state.current = 0;
  state.decided = {};
  progress(batch.done, batch.total);
  setStatus(batch.items.length ? "" : "nothing left to review with this strategy");
  render();
}

function imageUrl(item) {
  if (state.showIF && state.me.markers.length) {
    return "/api/crops/" + item.row + "/if.png?channels=" + encodeURIComponent(state.channels.join(","));
  }
  return "/api/crops/" + item.row + "/he.png";
}

function render() {
  const grid = document.getElementById("grid");
  grid.replaceChildren(...state.items.map((item, i) => {
    const cell = el("div", { className: "cell" + (i === state.current ? " current" : "") + (state.decided[item.row] ? " decided" : "") });
    cell.dataset.row = item.row;
    cell.append(el("img", { src: imageUrl(item), alt: "cell " + item.row }));
    if (item.proposed !== undefined) cell.append(el("div", { className: "proposed" }, "proposed: " + item.proposed));
    cell.append(el("div", { className: "decision" }, state.decided[item.row] || ""));
    cell.onclick = () => { state.current = i; render(); };
    return cell;
  }));
  const box = document.getElementById("context-box");
  box.hidden = !(state.showContext && state.me.context && state.items.length);
  if (!box.hidden) document.getElementById("context").src = "/api/crops/" + state.items[state.current].row + "/context.png";
}

function move(step) {
  if (!state.items.length) return;
  state.current = Math.min(Math.max(state.current + step, 0), state.items.length - 1);
  render();
}

// Requests go out one after another (a queue), while the grid moves on at once: fast typing
// never labels the same cell twice or loses a key press.
state.queue = Promise.resolve();
state.pending = 0;

function enqueue(task) {
  state.pending += 1;
  state.queue = state.queue.then(task).catch(e => setStatus("not saved: " + e.message)).finally(() => { state.pending -= 1; });
  return state.queue;
}

// Leaving the page while decisions are still on their way asks first.
window.addEventListener("beforeunload", event => { if (state.pending > 0) event.preventDefault(); });

function decide(label) {
  const item = state.items[state.current];
  if (!item) return;
  const bar = document.getElementById("progress");
  const before = state.decided[item.row];
  if (!before) progress(Number(bar.value) + 1, Number(bar.max));
  state.decided[item.row] = label;
  state.undo.push(state.current);
  const next = state.items.findIndex((it, i) => i > state.current && !state.decided[it.row]);
  const first = state.items.findIndex(it => !state.decided[it.row]);
  if (next >= 0) state.current = next;
  else if (first >= 0) state.current = first;
  render();
  enqueue(async () => {
    try {
      await api("/api/decisions", { method: "POST", body: JSON.stringify({ row: item.row, label, unsure: label === "ambiguous" }) });
      setStatus("saved " + label + " for cell " + item.row);
    } catch (e) {
      if (before) state.decided[item.row] = before; else delete state.decided[item.row];
      render();
      throw e;
    }
  });
  if (state.items.every(it => state.decided[it.row])) enqueue(loadBatch);
}

function undo() {
  const index = state.undo.pop();
  if (index === undefined || !state.items[index]) { setStatus("nothing to undo"); return; }
  const item = state.items[index];
  state.current = index;
  render();
  enqueue(async () => {
    const result = await api("/api/undo", { method: "POST", body: JSON.stringify({ row: item.row }) });
    const bar = document.getElementById("progress");
    if (!result.label && state.decided[item.row]) progress(Math.max(Number(bar.value) - 1, 0), Number(bar.max));
    if (result.label) state.decided[item.row] = result.label; else delete state.decided[item.row];
    setStatus("undone: cell " + item.row);
    render();
  });
}

document.addEventListener("keydown", event => {
  if (document.getElementById("app").hidden || event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.target instanceof HTMLInputElement || event.target instanceof HTMLSelectElement) return;
  const key = event.key.toLowerCase();
  let handled = true;
  if (KEYS[key]) decide(KEYS[key]);
  else if (key === "arrowright" || key === " ") move(1);
  else if (key === "arrowleft") move(-1);
  else if (key === "arrowdown") move(COLS);
  else if (key === "arrowup") move(-COLS);
  else if (key === "z") undo();
  else if (key === "i") { state.showIF = !state.showIF; render(); }
  else if (key === "c") { state.showContext = !state.showContext; render(); }
  else if (key === "n") loadBatch().catch(e => setStatus(e.message));
  else handled = false;
  if (handled) event.preventDefault();
});

document.getElementById("login-form").addEventListener("submit", async event => {
  event.preventDefault();
  if (await login(document.getElementById("token").value.trim())) start().catch(e => setStatus(e.message));
});

if (state.token) {
  login(state.token).then(ok => ok && start()).catch(() => showLogin());
} else {
  showLogin();
}
